"""Success predicates on hand-placed states, and task success on hand-placed simulator states."""

import mujoco
import torch

from vla_rl.envs import make_env
from vla_rl.rewards import all_of, grasped, in_region, lifted, outcome_reward, released


def test_predicates_on_tensors():
    obj = torch.tensor([[0.0, 0.0, 0.2], [0.0, 0.0, 0.02], [0.3, 0.0, 0.02]])
    assert lifted(obj, 0.1).tolist() == [True, False, False]
    center = torch.zeros(3, 3)
    assert in_region(obj, center, 0.05).tolist() == [True, True, False]
    assert in_region(obj, center, 0.05, max_z=0.05).tolist() == [False, True, False]
    tcp = obj.clone()
    gap = torch.tensor([0.04, 0.09, 0.04])
    assert grasped(obj, tcp, gap, 0.04).tolist() == [True, False, True]
    assert grasped(obj, tcp + 0.1, gap, 0.04).tolist() == [False, False, False]
    assert released(gap, 0.04).tolist() == [False, True, False]
    both = all_of(lambda o: lifted(o, 0.1), lambda o: in_region(o, center, 0.05))
    assert both(obj).tolist() == [True, False, False]
    assert outcome_reward(both(obj)).tolist() == [1.0, 0.0, 0.0]


def _place_object(env, i, k, pos):
    d = env.datas[i]
    qa = env.obj_qadr[k]
    d.qpos[qa:qa + 3] = pos
    d.qvel[:] = 0
    mujoco.mj_forward(env.models[i], d)


def test_lift_success_only_for_target():
    env = make_env("lift", 2, seed=0)
    env.reset()
    target = env.episode.target
    _place_object(env, 0, int(target[0]), [0.1, 0.0, 0.2])  # the named object up
    _place_object(env, 1, (int(target[1]) + 1) % 3, [0.1, 0.0, 0.2])  # a distractor up
    env._gather()
    assert env._success().tolist() == [True, False]


def test_place_success_needs_right_container_and_open_gripper():
    env = make_env("place", 3, seed=0)
    env.reset()
    for i in range(3):
        goal = int(env.episode.goal[i]) if i < 2 else 1 - int(env.episode.goal[i])
        c = env.datas[i].mocap_pos[env.cont_mocap[goal]]
        _place_object(env, i, int(env.episode.target[i]), [c[0], c[1], 0.025])
    env.datas[1].qpos[env.finger_qadr[0]] = 0.0  # gripper closed: not released
    mujoco.mj_forward(env.models[1], env.datas[1])
    env._gather()
    assert env._success().tolist() == [True, False, False]


def test_handover_success_on_hand_placed_state():
    env = make_env("handover", 1, seed=0)
    env.reset()
    d = env.datas[0]
    tcp_right = d.site_xpos[env.tcp_site[1]].copy()
    _place_object(env, 0, 0, tcp_right)
    env._gather()
    assert not env._success().item()  # right gripper open, object at table level? not held
    d.qpos[env.finger_qadr[1]] = 0.015  # right fingers closed on the 4 cm block
    mujoco.mj_forward(env.models[0], d)
    env._gather()
    assert env._success().item() == (tcp_right[2] > 0.1)
