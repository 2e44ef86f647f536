"""MuJoCo CPU backend: ``num_envs`` copies of a task, one ``MjModel``/``MjData`` pair per env.

Each env owns a model copy so that per-env domain randomization (friction, masses, gains, colours,
lights, camera) is a plain write into that env's model. Physics runs as one ``mj_step(m, d, nstep)``
call per env per control step (the C loop does the substeps). Batched state is gathered into torch
tensors once per control step and everything above (observations, predicates, experts) is torch.

Control: per hand ``(dx, dy, dz, grip)`` in [-1, 1]; the mocap target moves by ``MAX_DELTA * d``
(clamped to the workspace box), grip +1 = open, -1 = closed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from . import randomization as rnd
from .base import BatchedEnv, EnvError, EnvSpec, Obs
from .mujoco_install import import_mujoco
from .tasks import Task, TaskState, task_observation
from .tasks.scene import COLORS, FINGER_MAX, FINGER_PAD, NUM_TABLE_TEXTURES

mujoco = import_mujoco()  # a half-downgraded install is named with its one-line fix

CONTROL_HZ = 10.0
MAX_DELTA = 0.03  # metres per control step at |action| = 1
WORKSPACE_LOW = (-0.35, -0.4, 0.02)
WORKSPACE_HIGH = (0.35, 0.4, 0.45)
_WORKSPACE_LOW, _WORKSPACE_HIGH = np.array(WORKSPACE_LOW), np.array(WORKSPACE_HIGH)


_DIVERGENCE_WARNINGS = (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                        mujoco.mjtWarning.mjWARN_BADQACC)


def _divergence_count(d: mujoco.MjData) -> int:
    """MuJoCo resets a diverged MjData itself and counts it in these warnings; growth = divergence."""
    return sum(int(d.warning[w].number) for w in _DIVERGENCE_WARNINGS)


class MujocoCPUEnv(BatchedEnv):
    def __init__(
        self,
        task: Task,
        num_envs: int,
        device="cpu",
        cameras: tuple[str, ...] = (),
        image_size: tuple[int, int] = (128, 128),
        randomization: rnd.RandomizationConfig | dict | None = None,
        seed: int | None = None,
        max_episode_steps: int | None = None,
        state_includes_objects: bool | None = None,
    ):
        self.task = task
        self.base_model = mujoco.MjModel.from_xml_string(task.xml())
        self.cameras = tuple(cameras)
        for cam in self.cameras:
            if mujoco.mj_name2id(self.base_model, mujoco.mjtObj.mjOBJ_CAMERA, cam) < 0:
                raise EnvError(f"unknown camera {cam!r}; valid: {self._camera_names()}")
        self.image_size = tuple(image_size)
        self.rand = None
        if randomization is not None:
            self.rand = (randomization if isinstance(randomization, rnd.RandomizationConfig)
                         else rnd.RandomizationConfig.from_dict(randomization))
        self.state_includes_objects = (not self.cameras) if state_includes_objects is None else state_includes_objects
        self.substeps = int(round(1.0 / (CONTROL_HZ * self.base_model.opt.timestep)))  # the scene's own step
        self._resolve_ids()
        nh, no, nc = len(task.hands), len(task.objects), len(task.containers)
        state_names = [f"{h.name}_{k}" for h in task.hands for k in ("tcp_x", "tcp_y", "tcp_z", "gap")]
        obj_names = [f"{o}_{a}" for o, _ in task.objects for a in "xyz"]
        obj_names += [f"{c[0]}_{a}" for c in task.containers for a in "xyz"]
        if self.state_includes_objects:
            state_names += obj_names
        spec = EnvSpec(
            action_dim=4 * nh,
            state_dim=len(state_names),
            privileged_dim=3 * (no + nc),
            cameras=self.cameras,
            image_size=self.image_size if self.cameras else (0, 0),
            control_hz=CONTROL_HZ,
            max_episode_steps=max_episode_steps or task.max_episode_steps,
            action_low=(-1.0,) * (4 * nh),
            action_high=(1.0,) * (4 * nh),
            action_names=tuple(f"{h.name}_{k}" for h in task.hands for k in ("dx", "dy", "dz", "grip")),
            # end-effector position deltas + an absolute gripper command: hold = stop, gripper unchanged
            action_hold=("zero", "zero", "zero", "last") * nh,
            action_control="ee_delta",
            state_names=tuple(state_names),
            instructions=tuple(task.templates),
            extra={"task": task.name, "privileged_names": tuple(obj_names), "max_delta_m": MAX_DELTA},
        )
        super().__init__(spec, num_envs, device)
        n = self.num_envs
        self.models = [copy.deepcopy(self.base_model) for _ in range(n)]
        self.datas = [mujoco.MjData(m) for m in self.models]
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self._seed = seed
        self.episode = None
        self.rand_values: dict[str, torch.Tensor] = {}
        self._delay = torch.zeros(n, dtype=torch.long)
        self._action_hist = torch.zeros(n, 1, spec.action_dim)
        self._warnings = np.zeros(n, dtype=np.int64)
        self._bad = np.zeros(n, dtype=bool)
        self._renderer = None
        self._render_model = None
        self.reset_count = 0
        self._group_size = 1
        self._gather()

    # ---------------------------------------------------------------- model bookkeeping
    def _camera_names(self):
        return [mujoco.mj_id2name(self.base_model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.base_model.ncam)]

    def _resolve_ids(self):
        m, t = self.base_model, self.task
        body = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)  # noqa: E731
        self.obj_body = np.array([body(o) for o, _ in t.objects])
        self.obj_qadr = np.array([m.jnt_qposadr[m.body_jntadr[b]] for b in self.obj_body])
        self.obj_dadr = np.array([m.jnt_dofadr[m.body_jntadr[b]] for b in self.obj_body])
        self.obj_geom = np.array([m.body_geomadr[b] for b in self.obj_body])
        self.cont_mocap = np.array([m.body_mocapid[body(c[0])] for c in t.containers], dtype=int)
        self.cont_geoms = [np.nonzero(m.geom_bodyid == body(c[0]))[0] for c in t.containers]
        self.hand_mocap = np.array([m.body_mocapid[body(h.name + "_target")] for h in t.hands])
        self.hand_body = np.array([body(h.name) for h in t.hands])
        self.hand_qadr = np.array([m.jnt_qposadr[m.body_jntadr[b]] for b in self.hand_body])
        self.tcp_site = np.array([mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, h.name + "_tcp") for h in t.hands])
        jnt = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, name)  # noqa: E731
        self.finger_qadr = np.array([[m.jnt_qposadr[jnt(f"{h.name}_finger_{s}")] for s in "lr"] for h in t.hands])
        self.finger_dof = np.array([[m.jnt_dofadr[jnt(f"{h.name}_finger_{s}")] for s in "lr"] for h in t.hands])
        self.light_id = 0
        self.floor_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        self.table_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "table")
        self.table_mat0 = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_MATERIAL, "table_mat0")
        self.grip_geoms = np.array([mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"{h.name}_finger_{s}")
                                    for h in t.hands for s in "lr"])

    def seed(self, seed: int) -> None:
        self._seed = int(seed)
        self.gen = torch.Generator().manual_seed(int(seed))

    # ---------------------------------------------------------------- hooks
    def _reset_envs(self, env_ids: torch.Tensor) -> None:
        ids = env_ids.cpu().tolist()
        n = len(ids)
        # Grouped reset (reset_group): one draw per block of `g` envs, repeated, so the block starts identically.
        g = self._group_size
        leader = torch.arange(n) // g
        m = int(leader[-1]) + 1 if n else 0
        ep = _take_episodes(self.task.sample(self.gen, m), leader)
        values = rnd.sample(self.rand, self.gen, m, NUM_TABLE_TEXTURES) if self.rand else None
        if values is not None:
            values = {k: v[leader] for k, v in values.items()}
        if self.episode is None:
            self.episode = self.task.sample(torch.Generator().manual_seed(0), self.num_envs)
        for field in ("obj_xy", "container_xy", "colors", "target", "goal"):
            getattr(self.episode, field)[env_ids.cpu()] = getattr(ep, field)
        hand_start = self.task.hand_start().numpy()
        for j, i in enumerate(ids):
            m, d = self.models[i], self.datas[i]
            if values is not None:
                self._apply_randomization(i, {k: v[j] for k, v in values.items()})
            self._apply_colors(i, ep.colors[j], None if values is None else float(values["object_brightness"][j]))
            mujoco.mj_resetData(m, d)
            d.mocap_pos[self.hand_mocap] = hand_start
            d.mocap_quat[self.hand_mocap] = m.body_quat[self.hand_body]
            for k, (qa, b) in enumerate(zip(self.obj_qadr, self.obj_body)):
                d.qpos[qa:qa + 2] = ep.obj_xy[j, k].numpy()
                d.qpos[qa + 2] = m.body_pos[b][2]
            for k, mid in enumerate(self.cont_mocap):
                d.mocap_pos[mid, :2] = ep.container_xy[j, k].numpy()
            d.ctrl[:] = FINGER_MAX
            d.qpos[self.finger_qadr.ravel()] = FINGER_MAX
            mujoco.mj_forward(m, d)
            self.episode.instruction[i] = ep.instruction[j]
            self._warnings[i] = _divergence_count(d)
        if values is not None:
            if not self.rand_values:
                self.rand_values = {k: torch.zeros((self.num_envs, *v.shape[1:]), dtype=v.dtype) for k, v in values.items()}
            for k, v in values.items():
                self.rand_values[k][env_ids.cpu()] = v
            self._delay[env_ids.cpu()] = values["action_delay"]
        depth = int(self._delay.max()) + 1
        if self._action_hist.shape[1] != depth:
            self._action_hist = torch.zeros(self.num_envs, depth, self.spec.action_dim)
        self._action_hist[env_ids.cpu()] = self._neutral_action()
        self.reset_count += n
        self._gather()

    def reset_group(self, group_size: int, seed: int | None = None):
        """Reset every env so that each consecutive block of ``group_size`` envs starts identically (same
        scene, instruction and randomization draw), for group-relative advantages (DPPOConfig.advantage
        = "group" with RunnerConfig.group_size). Later auto-resets draw independently again."""
        if group_size < 1 or self.num_envs % group_size:
            raise EnvError(f"group_size must divide num_envs={self.num_envs}, got {group_size}")
        self._group_size = group_size
        try:
            return self.reset(seed)
        finally:
            self._group_size = 1

    def _neutral_action(self) -> torch.Tensor:
        a = torch.zeros(self.spec.action_dim)
        a[3::4] = 1.0  # gripper open
        return a

    def _apply_colors(self, i: int, colors: torch.Tensor, brightness: float | None):
        names = list(COLORS)
        m = self.models[i]
        for k, g in enumerate(self.obj_geom):
            rgb = np.array(COLORS[names[int(colors[k])]])
            if brightness is not None:
                rgb = rgb / max(rgb.max(), 1e-6) * brightness
            m.geom_rgba[g, :3] = rgb

    def _apply_randomization(self, i: int, v: dict):
        m, b = self.models[i], self.base_model
        m.light_diffuse[self.light_id] = v["light_rgb"].numpy()
        if "floor_rgb" in v:
            m.geom_rgba[self.floor_geom, :3] = v["floor_rgb"].numpy()
        if "table_texture" in v:
            m.geom_matid[self.table_geom] = self.table_mat0 + int(v["table_texture"])
        m.cam_pos[:] = b.cam_pos + v["camera_offset"].numpy()
        m.cam_fovy[:] = b.cam_fovy + float(v["camera_fovy_offset"])
        grip = np.concatenate([self.obj_geom, self.grip_geoms])
        m.geom_friction[grip, 0] = b.geom_friction[grip, 0] * float(v["friction"])
        m.body_mass[self.obj_body] = b.body_mass[self.obj_body] * float(v["mass"])
        dofs = self.finger_dof.ravel()
        m.dof_damping[dofs] = b.dof_damping[dofs] * float(v["damping"])
        m.dof_armature[dofs] = b.dof_armature[dofs] * float(v["armature"])
        g = float(v["actuator_gain"])
        m.actuator_gainprm[:, 0] = b.actuator_gainprm[:, 0] * g
        m.actuator_biasprm[:, 1] = b.actuator_biasprm[:, 1] * g

    def _control_step(self, action: torch.Tensor) -> None:
        action = action.detach().cpu().float().clamp(-1.0, 1.0)
        if self.rand is not None and self.rand.dynamics.action_noise > 0:
            noise = torch.randn(action.shape, generator=self.gen) * self.rand.dynamics.action_noise
            action = (action + noise).clamp(-1.0, 1.0)
        # Action delay: the history holds the last `depth` actions; env i executes the one `delay_i` old.
        # Depth 1 (no delay anywhere) is the common case: the history is never read, so skip it.
        if self._action_hist.shape[1] == 1:
            executed = action.numpy()
        else:
            self._action_hist = torch.cat([action[:, None], self._action_hist[:, :-1]], dim=1)
            executed = self._action_hist[torch.arange(self.num_envs), self._delay].numpy()
        a = executed.reshape(self.num_envs, -1, 4)
        ctrl = np.repeat((a[:, :, 3] + 1.0) * 0.5 * FINGER_MAX, 2, axis=1)  # both fingers of every hand
        for i, d in enumerate(self.datas):
            d.mocap_pos[self.hand_mocap] = np.clip(d.mocap_pos[self.hand_mocap] + MAX_DELTA * a[i, :, :3],
                                                   _WORKSPACE_LOW, _WORKSPACE_HIGH)
            d.ctrl[:] = ctrl[i]
        # One C call per env runs all substeps. (A thread pool over envs measured slower here: the
        # bindings hold the GIL in mj_step; mujoco.batch is the way to multi-thread, see README.)
        self._physics(range(self.num_envs))
        for i, d in enumerate(self.datas):
            w = _divergence_count(d)
            self._bad[i] = w > self._warnings[i] or not np.isfinite(d.qpos).all() or not np.isfinite(d.qvel).all()
            self._warnings[i] = w
        self._gather()

    def _physics(self, env_ids) -> None:
        for i in env_ids:
            mujoco.mj_step(self.models[i], self.datas[i], nstep=self.substeps)

    def _gather(self):
        """Copy the state the task needs from every MjData into batched torch tensors."""
        d0 = self.datas
        xpos = np.stack([d.xpos for d in d0])
        self.obj_pos = torch.from_numpy(xpos[:, self.obj_body]).float()
        mocap = np.stack([d.mocap_pos for d in d0])
        self.cont_pos = torch.from_numpy(mocap[:, self.cont_mocap].reshape(len(d0), -1, 3)).float()
        self.tcp = torch.from_numpy(np.stack([d.site_xpos[self.tcp_site] for d in d0])).float()
        qf = np.stack([d.qpos[self.finger_qadr.ravel()] for d in d0]).reshape(len(d0), -1, 2)
        self.gap = torch.from_numpy(qf.sum(-1) + 2 * FINGER_PAD).float()

    def task_state(self) -> TaskState:
        dev = self.device
        return TaskState(self.obj_pos.to(dev), self.cont_pos.to(dev), self.tcp.to(dev), self.gap.to(dev))

    def _success(self) -> torch.Tensor:
        s = self.task_state()
        ok = self.task.success(s, self.episode) & torch.isfinite(s.obj_pos).all(-1).all(-1)
        # A diverged env was reset by MuJoCo to an arbitrary state mid-step: never count it a success.
        return ok.to(self.device) & ~self._unstable()

    def _unstable(self) -> torch.Tensor:
        return torch.from_numpy(self._bad.copy()).to(self.device)

    def _observe(self) -> Obs:
        noise = self.rand.dynamics.obs_noise if self.rand is not None else 0.0
        s = TaskState(self.obj_pos, self.cont_pos, self.tcp, self.gap)  # host tensors: the noise stream stays on CPU
        obs = task_observation(s, self.episode.instruction, self.state_includes_objects, noise, self.gen)
        obs["state"], obs["privileged"] = obs["state"].to(self.device), obs["privileged"].to(self.device)
        if self.cameras:
            obs["rgb"] = self.render().to(self.device)
        return obs

    def _episode_info(self) -> dict:
        info = {"target": self.episode.target.clone().to(self.device)}
        if self.rand_values:
            info["randomization"] = {k: v.clone().to(self.device) for k, v in self.rand_values.items()}
        return info

    # ---------------------------------------------------------------- rendering
    _VISUAL_FIELDS = ("geom_rgba", "geom_matid", "light_diffuse", "cam_pos", "cam_fovy")

    def render(self) -> torch.Tensor:
        """uint8 [N, cams, 3, H, W] from an offscreen renderer (shadows off)."""
        h, w = self.image_size
        if self._renderer is None:
            self._render_model = copy.deepcopy(self.base_model)
            self._render_model.vis.global_.offwidth = max(w, 640)
            self._render_model.vis.global_.offheight = max(h, 480)
            try:
                self._renderer = mujoco.Renderer(self._render_model, h, w)
            except Exception as e:  # mujoco picked its GL backend at import time
                raise EnvError(
                    f"offscreen rendering failed ({e}); headless machines need MUJOCO_GL=egl (or osmesa) set "
                    "before mujoco is first imported (importing vla_rl.envs first does that)"
                ) from e
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        out = np.empty((self.num_envs, len(self.cameras), h, w, 3), dtype=np.uint8)
        rm = self._render_model
        for i, (m, d) in enumerate(zip(self.models, self.datas)):
            # One renderer for all envs: copy this env's randomized visual fields into its model.
            for f in self._VISUAL_FIELDS:
                getattr(rm, f)[:] = getattr(m, f)
            for c, cam in enumerate(self.cameras):
                self._renderer.update_scene(d, camera=cam)
                self._renderer.render(out=out[i, c])
        return torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def _take_episodes(ep, index: torch.Tensor):
    """Episode rows ``index`` (tensors and instructions alike)."""
    fields = {f: getattr(ep, f)[index] for f in ("obj_xy", "container_xy", "colors", "target", "goal")}
    return type(ep)(**fields, instruction=[ep.instruction[int(i)] for i in index])
