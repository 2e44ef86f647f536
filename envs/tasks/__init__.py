"""Built-in tasks, defined once for every backend: scene, instructions, episode sampling, success.

A task sees simulator state only through :class:`TaskState` (batched torch tensors), so the same
predicates run on the CPU backend and on GPU backends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vla_rl.rewards import grasped, in_region, lifted, released

from .scene import COLORS, GRASP_OFFSET, HandSpec, build_scene, container_xml, object_xml

OBJ_WIDTH = 0.04  # every object is 4 cm across the grasp axis


@dataclass
class TaskState:
    obj_pos: torch.Tensor  # [N, num_objects, 3]
    container_pos: torch.Tensor  # [N, num_containers, 3] (may have 0 containers)
    tcp: torch.Tensor  # [N, num_hands, 3]
    gap: torch.Tensor  # [N, num_hands] finger gap (m)


@dataclass
class Episode:
    obj_xy: torch.Tensor  # [n, num_objects, 2]
    container_xy: torch.Tensor  # [n, num_containers, 2]
    colors: torch.Tensor  # [n, num_objects] index into COLORS
    target: torch.Tensor  # [n] object index named by the instruction
    goal: torch.Tensor  # [n] container index (0 if none)
    instruction: list[str]


COLOR_NAMES = list(COLORS)


def task_observation(s: TaskState, instructions: list[str], include_objects: bool, obs_noise: float = 0.0,
                     generator: torch.Generator | None = None) -> dict:
    """The built-in tasks' observation, the same on every backend: ``state`` = per hand (tcp xyz, finger
    gap), then (``include_objects``) object and container positions, plus ``obs_noise`` Gaussian noise
    drawn from ``generator`` (on its device); ``privileged`` = the noise-free object and container
    positions (critic only); ``instruction``."""
    n = s.tcp.shape[0]
    proprio = torch.cat([s.tcp, s.gap[..., None]], dim=-1).reshape(n, -1)
    privileged = torch.cat([s.obj_pos.reshape(n, -1), s.container_pos.reshape(n, -1)], dim=-1)
    state = torch.cat([proprio, privileged], -1) if include_objects else proprio
    if obs_noise > 0:
        device = generator.device if generator is not None else state.device
        state = state + torch.randn(state.shape, generator=generator, device=device).to(state.device) * obs_noise
    return {"state": torch.nan_to_num(state), "privileged": torch.nan_to_num(privileged),
            "instruction": list(instructions)}


def _slots(gen, n, base_xy, jitter):
    """Randomly permute fixed slots among items and jitter them: [n, k, 2]."""
    base = torch.tensor(base_xy, dtype=torch.float32)
    perm = torch.argsort(torch.rand(n, len(base_xy), generator=gen), dim=1)
    xy = base[perm]
    return xy + (torch.rand(xy.shape, generator=gen) * 2 - 1) * torch.tensor(jitter)


def _colors(gen, n, k):
    return torch.argsort(torch.rand(n, len(COLOR_NAMES), generator=gen), dim=1)[:, :k]


class Task:
    name: str
    hands: list[HandSpec]
    objects: list[tuple[str, str]]  # (body name, shape)
    containers: list[tuple[str, str, float, float, tuple]] = []  # (body, label, half, wall, rgba)
    templates: list[str]
    max_episode_steps: int = 60

    def __init__(self, arm: bool = False):
        # arm=True stands a 6-joint arm behind each gripper (see scene.py); off by default because the
        # extra constraints make mujoco-warp worlds differ bitwise after a neighbour's reset.
        self.arm = arm
        if not arm:
            self.hands = [replace(h, base=None) for h in type(self).hands]

    def xml(self) -> str:
        bodies = "".join(object_xml(n, s) for n, s in self.objects)
        bodies += "".join(container_xml(b, h, w, rgba) for b, _, h, w, rgba in self.containers)
        return build_scene(self.hands, bodies)

    @property
    def action_dim(self) -> int:
        return 4 * len(self.hands)

    def hand_start(self) -> torch.Tensor:
        return torch.tensor([h.pos for h in self.hands], dtype=torch.float32)

    def sample(self, gen: torch.Generator, n: int) -> Episode:
        raise NotImplementedError

    def success(self, s: TaskState, ep: Episode) -> torch.Tensor:
        raise NotImplementedError

    def instruction_text(self, gen, ep: Episode, i: int) -> str:
        shape = self.objects[int(ep.target[i])][1]
        color = COLOR_NAMES[int(ep.colors[i, ep.target[i]])]
        t = self.templates[int(torch.randint(0, len(self.templates), (1,), generator=gen))]
        label = self.containers[int(ep.goal[i])][1] if self.containers else ""
        return t.format(color=color, object=shape, container=label)


def _target_pos(s: TaskState, ep: Episode) -> torch.Tensor:
    idx = ep.target.to(s.obj_pos.device)
    return s.obj_pos[torch.arange(len(idx), device=idx.device), idx]


class Lift(Task):
    name = "lift"
    hands = [HandSpec("hand", (0.0, 0.0, 0.25), base=(-0.5, 0.0, 0.0))]
    objects = [("obj0", "cube"), ("obj1", "cylinder"), ("obj2", "block")]
    templates = ["pick up the {color} {object}", "lift the {color} {object}", "grab the {color} {object} and raise it"]
    lift_height = 0.1

    def sample(self, gen, n):
        xy = _slots(gen, n, [(0.0, -0.13), (0.0, 0.0), (0.0, 0.13)], (0.08, 0.02))
        ep = Episode(xy, torch.zeros(n, 0, 2), _colors(gen, n, 3),
                     torch.randint(0, 3, (n,), generator=gen), torch.zeros(n, dtype=torch.long), [])
        ep.instruction = [self.instruction_text(gen, ep, i) for i in range(n)]
        return ep

    def success(self, s, ep):
        return lifted(_target_pos(s, ep), self.lift_height)


class Place(Task):
    name = "place"
    hands = [HandSpec("hand", (0.0, 0.0, 0.25), base=(-0.5, 0.0, 0.0))]
    objects = [("obj0", "cube"), ("obj1", "cylinder")]
    containers = [("bowl", "red bowl", 0.055, 0.03, (0.8, 0.15, 0.15)), ("box", "blue box", 0.055, 0.05, (0.15, 0.2, 0.8))]
    templates = ["put the {color} {object} in the {container}", "place the {color} {object} into the {container}",
                 "move the {color} {object} to the {container}"]
    max_episode_steps = 80

    def sample(self, gen, n):
        obj = _slots(gen, n, [(0.05, -0.07), (0.05, 0.07)], (0.07, 0.02))
        cont = _slots(gen, n, [(-0.12, -0.2), (-0.12, 0.2)], (0.03, 0.02))
        ep = Episode(obj, cont, _colors(gen, n, 2), torch.randint(0, 2, (n,), generator=gen),
                     torch.randint(0, 2, (n,), generator=gen), [])
        ep.instruction = [self.instruction_text(gen, ep, i) for i in range(n)]
        return ep

    def success(self, s, ep):
        goal = ep.goal.to(s.container_pos.device)
        center = s.container_pos[torch.arange(len(goal), device=goal.device), goal]
        return in_region(_target_pos(s, ep), center, 0.05, max_z=0.05) & released(s.gap[:, 0], OBJ_WIDTH)


# Right hand of the bimanual setup points up (grasps from below) with fingers along x, so the two
# grippers can hold the same block at once without their fingers or palms touching.
_RIGHT_QUAT = (0.0, 0.70710678, 0.70710678, 0.0)


class Handover(Task):
    name = "handover"
    hands = [HandSpec("left", (0.0, -0.2, 0.2), base=(0.0, -0.6, 0.0)),
             HandSpec("right", (0.0, 0.2, 0.08), _RIGHT_QUAT, base=(0.0, 0.6, 0.0))]
    objects = [("obj0", "block")]
    templates = ["hand the {color} {object} over to the right arm", "pass the {color} {object} from left to right",
                 "give the {color} {object} to the right gripper"]
    max_episode_steps = 80
    handover_point = (0.0, 0.0, 0.2)

    def sample(self, gen, n):
        xy = torch.tensor([0.0, -0.15]) + (torch.rand(n, 1, 2, generator=gen) * 2 - 1) * torch.tensor([0.08, 0.04])
        ep = Episode(xy, torch.zeros(n, 0, 2), _colors(gen, n, 1), torch.zeros(n, dtype=torch.long),
                     torch.zeros(n, dtype=torch.long), [])
        ep.instruction = [self.instruction_text(gen, ep, i) for i in range(n)]
        return ep

    def success(self, s, ep):
        obj = s.obj_pos[:, 0]
        held_right = grasped(obj, s.tcp[:, 1], s.gap[:, 1], OBJ_WIDTH)
        return held_right & released(s.gap[:, 0], OBJ_WIDTH) & lifted(obj, 0.1)


TASKS: dict[str, type[Task]] = {"lift": Lift, "place": Place, "handover": Handover}


def get_task(name: str, arm: bool = False) -> Task:
    if name not in TASKS:
        from ..base import EnvError

        raise EnvError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](arm=arm)
