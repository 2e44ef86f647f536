"""mujoco-warp backend: ``num_envs`` worlds of one task in one batched warp model/data.

The same task definitions as the CPU backend (scene MJCF, instructions, success predicates,
randomization config) drive it; only the stepping differs:

* one ``mjw.Model`` / ``mjw.Data`` for all worlds, contact/constraint buffers sized to the task
  (``nconmax`` / ``njmax`` per world; oversized buffers cost a lot of speed on GPU, see GPU.md);
* on a CUDA device the ``substeps`` physics steps of one control period, the per-world reset and the
  renderer are captured once into CUDA graphs (``wp.ScopedCapture``) and replayed; on warp's CPU device
  (CI, tests) the same functions are launched directly;
* every per-step quantity (qpos, xpos, ctrl, images, the randomized model fields) is a zero-copy torch
  view of the warp array (``wp.to_torch``): actions are written into ``d.ctrl`` by torch, observations,
  rewards and success predicates are torch ops on those views, no host round-trip per step;
* auto-reset touches only the selected worlds: ``mjw.reset_data(m, d, mask)`` clears them, torch writes
  their initial qpos/qvel/mocap/ctrl and randomized model fields, then ``mjw.forward`` recomputes derived
  quantities (a pure function of the state: the other worlds' state is left bit-for-bit unchanged);
* per-world randomization writes into model fields allocated with a leading world dimension
  (``put_model(mjm, batch_sizes={field: N})``);
* cameras use mujoco-warp's batched ray tracer (``create_render_context`` / ``render``); the packed
  ABGR ``uint32`` buffer is reinterpreted as bytes in torch, giving ``uint8 [N, cams, 3, H, W]``
  without an extra kernel.

Cost on warp's CPU device (2-core CI-class VM, ``benchmarks/bench_warp.py --task toy``, 3-joint arm +
cube, 10 substeps): 1.4k physics steps/s at 8 worlds, 9k at 64, 24k at 256 (Python launch overhead
dominates: ~6 ms per ``mjw.step`` at 8 worlds), vs ~110k for a MuJoCo C loop; rendering one 64x64
camera costs ~0.8 ms per world per frame, 128x128 ~3 ms. Built-in ``lift`` (then 25 substeps of 4 ms; 10 of
10 ms since stop 15): 2k physics steps/s at 64 worlds vs 38k for the CPU backend. On CPU it is for tests; the point is the
CUDA path. A reset costs one ``mjw.forward`` over all worlds (about one physics step) per control step
in which any world resets. The first step compiles the kernels (~30-40 s cold, cached in
``~/.cache/warp``; ~3 min on first CUDA use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mujoco
import numpy as np
import torch

from .base import BatchedEnv, EnvError, EnvSpec, Obs
from .tasks import task_observation

try:  # optional extra: pip install vla-rl[warp]
    import warp as wp
    import mujoco_warp as mjw
except ImportError as e:  # pragma: no cover - exercised only without the extra
    wp = None
    mjw = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None


def warp_available() -> bool:
    return _IMPORT_ERROR is None


# ---------------------------------------------------------------------------------------------
# The state views the task code (observations, predicates, resets) sees.
class WarpViews:
    """Zero-copy torch views of one batched mujoco-warp Model/Data (leading dim = world).

    Data: ``qpos [N, nq]``, ``qvel [N, nv]``, ``ctrl [N, nu]``, ``act``, ``mocap_pos [N, nmocap, 3]``,
    ``mocap_quat``, ``xpos [N, nbody, 3]``, ``xquat [N, nbody, 4]``, ``xmat``, ``site_xpos``,
    ``site_xmat``, ``geom_xpos``, ``qacc``, ``time [N]``.
    Model fields are available through :meth:`model_field` (batched ones have leading dim N).
    Names resolve through :attr:`mjm` (e.g. ``views.body("cube")`` -> body id).
    """

    DATA_FIELDS = (
        "qpos", "qvel", "qacc", "ctrl", "act", "mocap_pos", "mocap_quat", "xpos", "xquat", "xmat",
        "site_xpos", "site_xmat", "geom_xpos", "geom_xmat", "time", "sensordata", "qfrc_actuator",
    )

    def __init__(self, mjm, m, d):
        self.mjm = mjm
        self._m = m
        self._d = d
        self._model_cache: dict[str, torch.Tensor] = {}
        for name in self.DATA_FIELDS:
            arr = getattr(d, name, None)
            if arr is None:
                continue
            setattr(self, name, wp.to_torch(arr, requires_grad=False))

    def model_field(self, name: str) -> torch.Tensor:
        t = self._model_cache.get(name)
        if t is None:
            t = wp.to_torch(getattr(self._m, name), requires_grad=False)
            self._model_cache[name] = t
        return t

    # name lookups, mirroring mujoco.MjModel's named access
    def body(self, name: str) -> int:
        return _name2id(self.mjm, mujoco.mjtObj.mjOBJ_BODY, name)

    def site(self, name: str) -> int:
        return _name2id(self.mjm, mujoco.mjtObj.mjOBJ_SITE, name)

    def joint_qposadr(self, name: str) -> int:
        return int(self.mjm.jnt_qposadr[_name2id(self.mjm, mujoco.mjtObj.mjOBJ_JOINT, name)])

    def joint_dofadr(self, name: str) -> int:
        return int(self.mjm.jnt_dofadr[_name2id(self.mjm, mujoco.mjtObj.mjOBJ_JOINT, name)])


def _name2id(mjm, obj, name: str) -> int:
    i = mujoco.mj_name2id(mjm, obj, name)
    if i < 0:
        raise EnvError(f"no {obj.name[6:].lower()} named {name!r} in the scene")
    return int(i)


# ---------------------------------------------------------------------------------------------
# What the backend needs from a task. ``bind_task`` builds one from the shared task definitions.
@dataclass
class WarpTaskBinding:
    """Backend-neutral pieces of a task, expressed over :class:`WarpViews`.

    mjm:           the compiled scene (the same MJCF the CPU backend compiles).
    spec:          the EnvSpec (action/state dims, cameras, image size, horizon).
    substeps:      physics steps per control step.
    instructions:  per-env instruction sampler ``(ids, generator) -> list[str]`` or a fixed list.
    apply_action:  ``(views, action [N, A]) -> None`` writes ctrl (and mocap) for all worlds.
    init_state:    ``(views, ids, generator) -> None`` writes qpos/qvel/mocap/ctrl of worlds ``ids``
                   after they were cleared to the model defaults.
    observe:       ``(views) -> dict`` with ``state`` and optional ``privileged`` tensors.
    success:       ``(views) -> bool [N]``.
    randomizer:    optional ``(views, ids, generator) -> dict[str, Tensor]``: draws the per-world factors
                   for ``ids``, writes them into the batched model fields and returns the drawn values.
    batched_fields: model fields the randomizer writes per world (allocated ``[N, ...]``).
    nconmax/njmax: per-world contact/constraint buffer sizes.
    """

    mjm: Any
    spec: EnvSpec
    substeps: int
    apply_action: Callable
    init_state: Callable
    observe: Callable
    success: Callable
    instructions: Any = ("",)
    randomizer: Callable | None = None
    batched_fields: tuple[str, ...] = ()
    nconmax: int | None = None
    njmax: int | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Per-world model-field randomization.
@dataclass
class FieldTerm:
    """One randomized factor written into batched model field(s) at reset.

    ``op="scale"``: ``field[w, index] = nominal[index] * u`` with ``u ~ U(low, high)`` (one draw per world,
    broadcast over the indexed elements; ``also`` lists further ``(field, index, sign)`` written with the
    same factor, e.g. ``body_inertia`` with ``body_mass`` or a position actuator's ``biasprm`` with its
    ``gainprm``). ``op="add"``: ``field[w, index] = nominal[index] + u`` (e.g. a camera position offset).
    ``op="set"``: ``field[w, index] = u`` with ``u ~ U(low, high)`` per component
    (``low``/``high`` broadcast to the trailing shape, e.g. an RGB colour or a light position).
    """

    name: str
    field: str
    index: Any
    low: Any
    high: Any
    op: str = "scale"
    shape: tuple[int, ...] = ()
    also: tuple = ()

    def fields(self) -> tuple[str, ...]:
        return (self.field,) + tuple(a[0] for a in self.also)


def _bcast(u: torch.Tensor, nom: torch.Tensor) -> torch.Tensor:
    """A scalar-per-world draw ``[k]`` broadcast over the indexed elements ``nom``."""
    return u.view((u.shape[0],) + (1,) * nom.dim()) if u.dim() == 1 else u


class FieldRandomizer:
    """Draws :class:`FieldTerm` factors per world and writes them in place (torch, on device)."""

    def __init__(self, mjm, terms: list[FieldTerm]):
        self.mjm = mjm
        self.terms = list(terms)
        self._nominal: dict[str, np.ndarray] = {}
        self._nominal_t: dict[tuple[str, torch.device], torch.Tensor] = {}
        for t in self.terms:
            for f in t.fields():
                if f not in self._nominal:
                    self._nominal[f] = np.array(getattr(mjm, f), dtype=np.float32)

    @property
    def batched_fields(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            out += [f for f in t.fields() if f not in out]
        return tuple(out)

    def __call__(self, views: WarpViews, ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        dev = ids.device
        k = ids.numel()

        def nominal(fname, idx):
            key = (fname, dev)
            if key not in self._nominal_t:
                self._nominal_t[key] = torch.as_tensor(self._nominal[fname], device=dev)
            return self._nominal_t[key][idx]

        draws = {}
        for t in self.terms:
            lo = torch.as_tensor(t.low, dtype=torch.float32, device=dev)
            hi = torch.as_tensor(t.high, dtype=torch.float32, device=dev)
            shape = (k,) + tuple(t.shape) if t.shape else (k,) + tuple(torch.broadcast_shapes(lo.shape, hi.shape))
            u = lo + (hi - lo) * torch.rand(shape, generator=gen, device=dev)
            draws[t.name] = u
            targets = [(t.field, t.index, 1.0)] + [tuple(a) if len(a) == 3 else (a[0], a[1], 1.0) for a in t.also]
            for fname, index, sign in targets:
                dst = views.model_field(fname)
                idx = index if isinstance(index, tuple) else (index,)
                if t.op == "scale":
                    nom = nominal(fname, idx)
                    val = nom.unsqueeze(0) * _bcast(u, nom)
                elif t.op == "add":
                    nom = nominal(fname, idx)
                    val = nom.unsqueeze(0) + sign * _bcast(u, nom)
                elif t.op == "set":
                    val = sign * u
                else:
                    raise EnvError(f"unknown randomization op {t.op!r}")
                sub = dst[ids]
                sub[(slice(None),) + idx] = val.to(sub.dtype).expand_as(sub[(slice(None),) + idx])
                dst[ids] = sub
        return draws


# ---------------------------------------------------------------------------------------------
class MujocoWarpEnv(BatchedEnv):
    """Batched env over one mujoco-warp Model/Data; see the module docstring."""

    def __init__(
        self,
        binding: WarpTaskBinding,
        num_envs: int,
        device: str | torch.device = "cpu",
        use_graph: bool | None = None,
        seed: int | None = None,
    ):
        if _IMPORT_ERROR is not None:
            raise ImportError(
                "the warp backend needs the optional extra: pip install 'vla-rl[warp]' "
                "(warp-lang, mujoco-warp)"
            ) from _IMPORT_ERROR
        super().__init__(binding.spec, num_envs, device)
        self.binding = binding
        self.mjm = binding.mjm
        self.substeps = int(binding.substeps)
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", idx)
            self.wp_device = wp.get_device(f"cuda:{idx}")
        elif self.device.type == "cpu":
            self.wp_device = wp.get_device("cpu")
        else:
            raise EnvError(f"warp backend runs on cpu or cuda devices, got {self.device}")
        # the base class allocated its counters on the unnormalized device
        self.episode_step = self.episode_step.to(self.device)
        self.episode_return = self.episode_return.to(self.device)
        self.use_graph = (self.wp_device.is_cuda if use_graph is None else bool(use_graph)) and self.wp_device.is_cuda
        n = self.num_envs
        with wp.ScopedDevice(self.wp_device):
            batch = {f: n for f in binding.batched_fields}
            self.m = mjw.put_model(self.mjm, batch_sizes=batch)
            kw = {}
            if binding.nconmax is not None:
                kw["nconmax"] = int(binding.nconmax)
            if binding.njmax is not None:
                kw["njmax"] = int(binding.njmax)
            self.d = mjw.make_data(self.mjm, nworld=n, **kw)
            self._reset_mask = wp.zeros(n, dtype=bool)
        self.views = WarpViews(self.mjm, self.m, self.d)
        self._reset_mask_t = wp.to_torch(self._reset_mask, requires_grad=False)
        self._nacon = wp.to_torch(self.d.nacon, requires_grad=False)
        self._naconmax = int(self.d.naconmax)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(0 if seed is None else int(seed))
        self._instructions: list[str] = [""] * n
        self._draws: dict[str, torch.Tensor] = {}
        self._unstable_flag = torch.zeros(n, dtype=torch.bool, device=self.device)
        # cameras
        self.cameras = tuple(self.spec.cameras)
        self._rc = None
        self._rgb_slices: list[tuple[int, int]] = []
        if self.cameras:
            self._init_renderer()
        # streams / graphs (CUDA only)
        self._stream = None
        self._graphs: dict[str, Any] = {}
        if self.wp_device.is_cuda:
            self._stream = wp.Stream(self.wp_device)
        if seed is not None:
            self.seed(seed)

    # ------------------------------------------------------------------ warp launches
    def _run(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (warp launches only) ordered after pending torch work and before later torch work.

        CPU: a direct call. CUDA: captured into a graph on first use (on a private stream), then
        replayed; event waits order it against torch's current stream without a host sync.
        """
        if not self.wp_device.is_cuda:
            with wp.ScopedDevice(self.wp_device):
                fn()
            return
        torch_stream = wp.stream_from_torch(torch.cuda.current_stream(self.device))
        self._stream.wait_stream(torch_stream)
        with wp.ScopedDevice(self.wp_device), wp.ScopedStream(self._stream):
            if not self.use_graph:
                fn()
            else:
                graph = self._graphs.get(key)
                if graph is None:
                    # First call: run it plainly (this loads the modules and is the real execution),
                    # then record the same launches into a graph (capturing does not execute them).
                    fn()
                    with wp.ScopedCapture(device=self.wp_device, stream=self._stream) as cap:
                        fn()
                    self._graphs[key] = cap.graph
                else:
                    wp.capture_launch(graph, stream=self._stream)
        torch_stream.wait_stream(self._stream)

    def _physics(self) -> None:
        for _ in range(self.substeps):
            mjw.step(self.m, self.d)

    def _reset_launch(self) -> None:
        mjw.reset_data(self.m, self.d, self._reset_mask)

    def _forward_launch(self) -> None:
        mjw.forward(self.m, self.d)

    def _render_launch(self) -> None:
        mjw.refit_bvh(self.m, self.d, self._rc)
        mjw.render(self.m, self.d, self._rc)

    # ------------------------------------------------------------------ BatchedEnv hooks
    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._gen.manual_seed(int(seed))

    def _reset_envs(self, env_ids: torch.Tensor) -> None:
        ids = env_ids.to(self.device, torch.long)
        if ids.numel() == 0:
            return
        b = self.binding
        self._reset_mask_t.zero_()
        self._reset_mask_t[ids] = True
        self._run("reset", self._reset_launch)
        if b.randomizer is not None:
            draws = b.randomizer(self.views, ids, self._gen)
            for k, v in draws.items():
                v = v.to(self.device)
                cur = self._draws.get(k)
                if cur is None:
                    cur = self._draws[k] = torch.zeros((self.num_envs,) + tuple(v.shape[1:]), dtype=v.dtype, device=self.device)
                cur[ids] = v
        b.init_state(self.views, ids, self._gen)
        self._run("forward", self._forward_launch)
        self._unstable_flag[ids] = False
        instr = b.instructions
        if callable(instr):
            new = instr(ids, self._gen)
        else:
            instr = list(instr)
            pick = torch.randint(len(instr), (ids.numel(),), generator=self._gen, device=self.device).tolist()
            new = [instr[i] for i in pick]
        for i, s in zip(ids.tolist(), new):
            self._instructions[i] = s

    def _control_step(self, action: torch.Tensor) -> None:
        self.binding.apply_action(self.views, action)
        self._run("physics", self._physics)
        v = self.views
        bad = ~torch.isfinite(v.qpos).all(1) | ~torch.isfinite(v.qvel).all(1)
        # MuJoCo's own divergence test (mju_isBad): |qacc| > 1e10
        bad |= ~(v.qacc.abs() < 1e10).all(1)
        self._unstable_flag = bad

    def _unstable(self) -> torch.Tensor:
        return self._unstable_flag

    def _success(self) -> torch.Tensor:
        return self.binding.success(self.views).to(torch.bool)

    def _observe(self) -> Obs:
        obs = dict(self.binding.observe(self.views))
        obs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}
        if self.cameras:
            obs["rgb"] = self.render()
        obs["instruction"] = list(self._instructions)
        return obs

    def _episode_info(self) -> dict:
        info = {f"rand/{k}": v.clone() for k, v in self._draws.items()}
        return info

    # ------------------------------------------------------------------ rendering
    def _init_renderer(self) -> None:
        h, w = self.spec.image_size
        cam_ids = [_name2id(self.mjm, mujoco.mjtObj.mjOBJ_CAMERA, c) for c in self.cameras]
        with wp.ScopedDevice(self.wp_device):
            self._rc = mjw.create_render_context(
                self.mjm,
                nworld=self.num_envs,
                cam_res=(w, h),
                render_rgb=True,
                render_depth=False,
                cam_active=cam_ids,
                use_shadows=False,
            )
        adr = self._rc.rgb_adr.numpy()
        for cid in cam_ids:
            a = int(adr[cid])
            if a < 0:
                raise EnvError(f"camera {cid} is not active in the render context")
            self._rgb_slices.append((4 * a, 4 * (a + h * w)))
        self._rgb_bytes = wp.to_torch(self._rc.rgb_data, requires_grad=False).view(torch.uint8)

    def render(self) -> torch.Tensor:
        """uint8 ``[N, cams, 3, H, W]`` of the current state of every world (row 0 = image top)."""
        if self._rc is None:
            raise EnvError("no cameras configured")
        self._run("render", self._render_launch)
        h, w = self.spec.image_size
        outs = []
        for lo, hi in self._rgb_slices:
            px = self._rgb_bytes[:, lo:hi].view(self.num_envs, h, w, 4)  # bytes B, G, R, A
            outs.append(px[..., [2, 1, 0]].permute(0, 3, 1, 2))
        return torch.stack(outs, 1).contiguous()

    # ------------------------------------------------------------------ misc
    def contact_overflow(self) -> bool:
        """True if the contact buffer overflowed (contacts were dropped): raise ``nconmax``."""
        return bool(self._nacon.max().item() > self._naconmax)

    def close(self) -> None:
        self._graphs.clear()
        self._rc = None


# ---------------------------------------------------------------------------------------------
# The built-in tasks (vla_rl.envs.tasks), mirroring MujocoCPUEnv step for step.
class TaskWarpEnv(MujocoWarpEnv):
    """A built-in task on mujoco-warp: same scene, episode sampler, randomization draws, control law,
    observations and success predicates as :class:`vla_rl.envs.mujoco_cpu.MujocoCPUEnv`.

    The episode sampler and ``randomization.sample`` draw from a CPU torch generator in the same order
    as the CPU backend, so the same seed gives the same episodes and factors on both backends; the
    draws are then written on device into the batched model fields.
    """

    VISUAL_FIELDS = ("light_diffuse", "geom_rgba", "geom_matid", "cam_pos", "cam_fovy")
    DYNAMICS_FIELDS = ("geom_friction", "body_mass", "dof_damping", "dof_armature", "actuator_gainprm", "actuator_biasprm")

    def __init__(self, task, num_envs, device="cpu", cameras=(), image_size=(128, 128), randomization=None,
                 seed=None, max_episode_steps=None, state_includes_objects=None, use_graph=None,
                 nconmax=None, njmax=None):
        from . import mujoco_cpu as cpu
        from . import randomization as rnd
        from .tasks import get_task

        self._cpu = cpu
        self._rnd = rnd
        task = get_task(task) if isinstance(task, str) else task
        # The CPU backend resolves ids, builds the spec and validates cameras; reuse it on a 1-env copy.
        ref = cpu.MujocoCPUEnv(task, 1, cameras=tuple(cameras), image_size=tuple(image_size),
                               randomization=randomization, seed=seed, max_episode_steps=max_episode_steps,
                               state_includes_objects=state_includes_objects)
        self.task, self.rand, self.ref = task, ref.rand, ref
        self.state_includes_objects = ref.state_includes_objects
        mjm = ref.base_model
        nobj, ncont, nh = len(task.objects), len(task.containers), len(task.hands)
        if nconmax is None:
            nconmax = 8 + 12 * (nobj + ncont + nh)
        if njmax is None:
            # weld (6) + finger limits (2 x 2) per hand, up to 4 rows per elliptic condim-4 contact
            njmax = 10 * nh + 4 * nconmax
        batched = self.VISUAL_FIELDS + (self.DYNAMICS_FIELDS if self.rand is not None else ())
        binding = WarpTaskBinding(
            mjm=mjm, spec=ref.spec, substeps=ref.substeps, apply_action=None, init_state=None,
            observe=None, success=None, batched_fields=batched, nconmax=nconmax, njmax=njmax,
        )
        self.cpu_gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        super().__init__(binding, num_envs, device, use_graph=use_graph, seed=seed)
        dev = self.device
        t = lambda a: torch.as_tensor(np.asarray(a), device=dev)  # noqa: E731
        self.obj_body, self.obj_qadr, self.obj_geom = t(ref.obj_body), t(ref.obj_qadr), t(ref.obj_geom)
        self.cont_mocap, self.hand_mocap, self.hand_body = t(ref.cont_mocap).long(), t(ref.hand_mocap), t(ref.hand_body)
        self.tcp_site, self.finger_qadr, self.finger_dof = t(ref.tcp_site), t(ref.finger_qadr.ravel()), t(ref.finger_dof.ravel())
        self.grip = t(np.concatenate([ref.obj_geom, ref.grip_geoms]))
        self.floor_geom, self.table_geom, self.table_mat0 = ref.floor_geom, ref.table_geom, ref.table_mat0
        self.hand_start = task.hand_start().to(dev)
        self.hand_quat = t(mjm.body_quat[ref.hand_body]).float()
        self.obj_z = t(mjm.body_pos[ref.obj_body][:, 2]).float()
        self.nominal = {f: t(getattr(mjm, f)).clone() for f in self.VISUAL_FIELDS + self.DYNAMICS_FIELDS}
        self.ws_lo = torch.tensor(cpu.WORKSPACE_LOW, device=dev)
        self.ws_hi = torch.tensor(cpu.WORKSPACE_HIGH, device=dev)
        from .tasks.scene import COLORS

        self.color_table = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=dev)
        self.episode = None
        self.rand_values: dict[str, torch.Tensor] = {}
        self._delay = torch.zeros(self.num_envs, dtype=torch.long, device=dev)
        self._action_hist = torch.zeros(self.num_envs, 1, self.spec.action_dim, device=dev)
        ref.close()

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.cpu_gen = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ hooks
    def _reset_envs(self, env_ids: torch.Tensor) -> None:
        cpu, rnd, task, dev = self._cpu, self._rnd, self.task, self.device
        ids_c = env_ids.cpu().long()
        ids = ids_c.to(dev)
        k = len(ids_c)
        if k == 0:
            return
        ep = task.sample(self.cpu_gen, k)
        values = rnd.sample(self.rand, self.cpu_gen, k, cpu.NUM_TABLE_TEXTURES) if self.rand else None
        if self.episode is None:
            self.episode = task.sample(torch.Generator().manual_seed(0), self.num_envs)
        for f in ("obj_xy", "container_xy", "colors", "target", "goal"):
            getattr(self.episode, f)[ids_c] = getattr(ep, f)
        self._reset_mask_t.zero_()
        self._reset_mask_t[ids] = True
        self._run("reset", self._reset_launch)
        v = self.views
        mf = v.model_field
        # visual: object colours (always), then the randomized factors
        rgb = self.color_table[ep.colors.to(dev)]  # [k, nobj, 3]
        if values is not None:
            b = values["object_brightness"].to(dev).float()
            rgb = rgb / rgb.amax(-1, keepdim=True).clamp_min(1e-6) * b[:, None, None]
        rgba = mf("geom_rgba")
        sub = rgba[ids]
        sub[:, self.obj_geom, :3] = rgb
        if values is not None:
            vv = {key: val.to(dev) for key, val in values.items()}
            if "floor_rgb" in vv:
                sub[:, self.floor_geom, :3] = vv["floor_rgb"].float()
            rgba[ids] = sub
            mf("light_diffuse")[ids, 0] = vv["light_rgb"].float()
            if "table_texture" in vv:
                mf("geom_matid")[ids, self.table_geom] = (self.table_mat0 + vv["table_texture"]).to(torch.int32)
            mf("cam_pos")[ids] = self.nominal["cam_pos"][None].float() + vv["camera_offset"].float()[:, None]
            mf("cam_fovy")[ids] = self.nominal["cam_fovy"][None].float() + vv["camera_fovy_offset"].float()[:, None]
            self._scale("geom_friction", ids, (self.grip, 0), vv["friction"])
            self._scale("body_mass", ids, (self.obj_body,), vv["mass"])
            self._scale("dof_damping", ids, (self.finger_dof,), vv["damping"])
            self._scale("dof_armature", ids, (self.finger_dof,), vv["armature"])
            self._scale("actuator_gainprm", ids, (slice(None), 0), vv["actuator_gain"])
            self._scale("actuator_biasprm", ids, (slice(None), 1), vv["actuator_gain"])
            if not self.rand_values:
                self.rand_values = {key: torch.zeros((self.num_envs, *val.shape[1:]), dtype=val.dtype, device=dev)
                                    for key, val in vv.items()}
            for key, val in vv.items():
                self.rand_values[key][ids] = val
            self._delay[ids] = vv["action_delay"].long()
        else:
            rgba[ids] = sub
        # initial state (the CPU backend's reset, on device)
        mp, mq, q = v.mocap_pos[ids], v.mocap_quat[ids], v.qpos[ids]
        mp[:, self.hand_mocap] = self.hand_start
        mq[:, self.hand_mocap] = self.hand_quat
        xy = ep.obj_xy.to(dev)
        for j in range(len(self.obj_qadr)):
            a = int(self.obj_qadr[j])
            q[:, a:a + 2] = xy[:, j]
            q[:, a + 2] = self.obj_z[j]
        if len(self.cont_mocap):
            mp[:, self.cont_mocap, :2] = ep.container_xy.to(dev)
        q[:, self.finger_qadr] = cpu.FINGER_MAX
        v.mocap_pos[ids], v.mocap_quat[ids], v.qpos[ids] = mp, mq, q
        v.ctrl[ids] = cpu.FINGER_MAX
        self._run("forward", self._forward_launch)
        self._unstable_flag[ids] = False
        for j, i in enumerate(ids_c.tolist()):
            self.episode.instruction[i] = ep.instruction[j]
        depth = int(self._delay.max()) + 1
        if self._action_hist.shape[1] != depth:
            self._action_hist = torch.zeros(self.num_envs, depth, self.spec.action_dim, device=dev)
        neutral = torch.zeros(self.spec.action_dim, device=dev)
        neutral[3::4] = 1.0
        self._action_hist[ids] = neutral

    def _scale(self, field: str, ids, index, factor) -> None:
        dst = self.views.model_field(field)
        nom = self.nominal[field][index].float()
        sub = dst[ids]
        sub[(slice(None),) + index] = nom[None] * _bcast(factor.float(), nom)
        dst[ids] = sub

    def _control_step(self, action: torch.Tensor) -> None:
        cpu, v, n = self._cpu, self.views, self.num_envs
        action = action.float().clamp(-1.0, 1.0)
        if self.rand is not None and self.rand.dynamics.action_noise > 0:
            noise = torch.randn(action.shape, generator=self._gen, device=self.device) * self.rand.dynamics.action_noise
            action = (action + noise).clamp(-1.0, 1.0)
        if self._action_hist.shape[1] == 1:  # no delay anywhere: the history is never read
            a = action.view(n, -1, 4)
        else:
            self._action_hist = torch.cat([action[:, None], self._action_hist[:, :-1]], dim=1)
            a = self._action_hist[torch.arange(n, device=self.device), self._delay].view(n, -1, 4)
        mp = v.mocap_pos[:, self.hand_mocap]
        v.mocap_pos[:, self.hand_mocap] = torch.minimum(torch.maximum(mp + cpu.MAX_DELTA * a[:, :, :3], self.ws_lo), self.ws_hi)
        grip = (a[:, :, 3] + 1.0) * 0.5 * cpu.FINGER_MAX
        v.ctrl.copy_(grip.repeat_interleave(2, dim=1))
        self._run("physics", self._physics)
        bad = ~torch.isfinite(v.qpos).all(1) | ~torch.isfinite(v.qvel).all(1) | ~(v.qacc.abs() < 1e10).all(1)
        self._unstable_flag = bad

    def task_state(self):
        from .tasks import TaskState

        v, n = self.views, self.num_envs
        gap = v.qpos[:, self.finger_qadr].view(n, -1, 2).sum(-1) + 2 * self._cpu.FINGER_PAD
        return TaskState(v.xpos[:, self.obj_body], v.mocap_pos[:, self.cont_mocap].reshape(n, -1, 3),
                         v.site_xpos[:, self.tcp_site], gap)

    def _success(self) -> torch.Tensor:
        s = self.task_state()
        return self.task.success(s, self.episode).to(self.device) & torch.isfinite(s.obj_pos).all(-1).all(-1)

    def _observe(self) -> Obs:
        noise = self.rand.dynamics.obs_noise if self.rand is not None else 0.0
        obs = task_observation(self.task_state(), self.episode.instruction, self.state_includes_objects, noise,
                               self._gen)
        if self.cameras:
            obs["rgb"] = self.render()
        return obs

    def _episode_info(self) -> dict:
        info = {"target": self.episode.target.clone().to(self.device)}
        if self.rand_values:
            info["randomization"] = {key: val.clone() for key, val in self.rand_values.items()}
        return info


# ---------------------------------------------------------------------------------------------
def make_warp_env(task, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None, **kwargs) -> MujocoWarpEnv:
    """``backend="warp"`` of ``make_env``: the same task names and keyword arguments.

    ``task`` is a task name / task object of ``vla_rl.envs.tasks`` or a ready :class:`WarpTaskBinding`.
    """
    if isinstance(task, WarpTaskBinding):
        if kwargs:
            raise EnvError(f"unexpected arguments for a WarpTaskBinding: {sorted(kwargs)}")
        return MujocoWarpEnv(task, num_envs, device, seed=seed)
    return TaskWarpEnv(task, num_envs, device=device, seed=seed, **kwargs)
