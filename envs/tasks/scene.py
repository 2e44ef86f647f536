"""Procedural MJCF for the built-in tasks: a table, one or two mocap-driven parallel grippers, objects.

Each gripper ("hand") is a free body welded (equality weld) to a mocap body, as in
gymnasium-robotics Fetch: the controller moves the mocap target and the weld pulls the hand along,
so the model needs no inverse kinematics and runs unchanged on mujoco-warp (mocap + weld are
supported there). With ``HandSpec.base`` set, a 6-joint arm stands on the table and a second weld
makes its wrist follow the hand (the arm is kinematic dressing: collision-free links, no effect on
the task beyond its inertia). Two fingers slide on position actuators. Only boxes, cylinders and a plane are
used, to keep the contact count small.

Frame: table top at z = 0, x forward, y left. Hand origin = palm centre; fingers point along the
hand's -z; finger inner faces are ``FINGER_PAD + q`` from the centre line (q = finger joint qpos).
"""

from __future__ import annotations

from dataclasses import dataclass

FINGER_PAD = 0.005  # half thickness of a finger box: gap = 2 * (FINGER_PAD + q)
FINGER_MAX = 0.04  # finger joint range [0, FINGER_MAX]
GRASP_OFFSET = 0.045  # hand z above the grasped object's centre
# Physics: 10 ms Euler steps, 10 per 10 Hz control step. Measured against the former 4 ms x 25 implicitfast
# (BENCHMARKS.md "Speed of the loop: the physics step ..."): 2.2-2.4x cheaper per env step, and every scripted expert keeps its success
# (lift / place / handover at action noise 0, 0.1, 0.2 and under the training and held-out dynamics
# randomization, place with the arm). implicitfast at 10 ms lost grasps under randomization (issue 13).
TIMESTEP = 0.01
INTEGRATOR = "Euler"
NUM_TABLE_TEXTURES = 8  # first half used in training, second half held out

COLORS = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.9, 0.8, 0.1),
}
# name -> (geom type, half sizes)
SHAPES = {
    "cube": ("box", (0.02, 0.02, 0.02)),
    "cylinder": ("cylinder", (0.02, 0.02)),
    "block": ("box", (0.02, 0.02, 0.035)),
}


@dataclass(frozen=True)
class HandSpec:
    name: str
    pos: tuple[float, float, float]
    quat: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    base: tuple[float, float, float] | None = None  # arm base on the table; None = free-floating gripper


ARM_LINK = 0.4


def _arm_xml(h: HandSpec) -> str:
    """A 6-joint arm (yaw, shoulder, elbow, 3 wrist joints) whose last link is welded to the hand.

    The weld on the hand drives the arm, as in Fetch: the links are collision-free (contype 0) so they
    add joints but no contacts. The hand stays a separate body so the mocap weld and finger geometry
    are the same with or without an arm.
    """
    n, (x, y, z) = h.name, h.base
    # Point the arm's x axis from its base towards the workspace centre.
    import math

    yaw = math.atan2(-y, -x) if (x, y) != (0, 0) else 0.0
    link = f'contype="0" conaffinity="0" rgba="0.75 0.75 0.78 1"'
    jnt = 'damping="1" armature="0.05" limited="false"'
    return f"""
    <body name="{n}_base" pos="{x:g} {y:g} {z:g}" euler="0 0 {yaw:g}">
      <geom type="cylinder" size="0.05 0.04" pos="0 0 0.04" {link}/>
      <body name="{n}_link1" pos="0 0 0.08" gravcomp="1">
        <joint name="{n}_j1" axis="0 0 1" {jnt}/>
        <geom type="capsule" fromto="0 0 0 0 0 0.22" size="0.035" mass="0.5" {link}/>
        <body name="{n}_link2" pos="0 0 0.22" gravcomp="1">
          <joint name="{n}_j2" axis="0 1 0" {jnt}/>
          <geom type="capsule" fromto="0 0 0 {ARM_LINK} 0 0" size="0.03" mass="0.5" {link}/>
          <body name="{n}_link3" pos="{ARM_LINK} 0 0" euler="0 1.2 0" gravcomp="1">
            <joint name="{n}_j3" axis="0 1 0" {jnt}/>
            <geom type="capsule" fromto="0 0 0 {ARM_LINK} 0 0" size="0.025" mass="0.4" {link}/>
            <body name="{n}_link4" pos="{ARM_LINK} 0 0" gravcomp="1">
              <joint name="{n}_j4" axis="0 1 0" {jnt}/>
              <joint name="{n}_j5" axis="0 0 1" {jnt}/>
              <joint name="{n}_j6" axis="1 0 0" {jnt}/>
              <geom type="capsule" fromto="0 0 0 0.05 0 0" size="0.02" mass="0.2" {link}/>
            </body>
          </body>
        </body>
      </body>
    </body>"""


def _hand_xml(h: HandSpec) -> str:
    p = " ".join(f"{v:g}" for v in h.pos)
    q = " ".join(f"{v:g}" for v in h.quat)
    n = h.name
    return f"""
    <body name="{n}_target" mocap="true" pos="{p}" quat="{q}"/>
    <body name="{n}" pos="{p}" quat="{q}" gravcomp="1">
      <freejoint name="{n}_free"/>
      <geom name="{n}_palm" type="box" size="0.015 0.055 0.01" rgba="0.3 0.3 0.35 1" mass="0.5"/>
      <site name="{n}_tcp" pos="0 0 -0.045" size="0.005"/>
      <body name="{n}_finger_l" pos="0 {FINGER_PAD} 0" gravcomp="1">
        <joint name="{n}_finger_l" type="slide" axis="0 1 0" range="0 {FINGER_MAX}" damping="2" armature="0.01"/>
        <geom name="{n}_finger_l" type="box" pos="0 {FINGER_PAD} -0.04" size="0.01 {FINGER_PAD} 0.03"
              friction="1.5 0.01 0.001" rgba="0.2 0.2 0.2 1" mass="0.05"/>
      </body>
      <body name="{n}_finger_r" pos="0 -{FINGER_PAD} 0" gravcomp="1">
        <joint name="{n}_finger_r" type="slide" axis="0 -1 0" range="0 {FINGER_MAX}" damping="2" armature="0.01"/>
        <geom name="{n}_finger_r" type="box" pos="0 -{FINGER_PAD} -0.04" size="0.01 {FINGER_PAD} 0.03"
              friction="1.5 0.01 0.001" rgba="0.2 0.2 0.2 1" mass="0.05"/>
      </body>
    </body>"""


def _hand_extras(h: HandSpec) -> tuple[str, str]:
    n = h.name
    equality = f'<weld body1="{n}_target" body2="{n}" solref="0.02 1"/>'
    if h.base is not None:  # the arm's wrist follows the hand (weld with the hand's current offset)
        equality += f'<weld body1="{n}" body2="{n}_link4" solref="0.02 1" relpose="0.0 0 0.1 1 0 0 0"/>'
    actuators = (
        f'<position name="{n}_finger_l" joint="{n}_finger_l" kp="200" ctrlrange="0 {FINGER_MAX}" forcerange="-20 20"/>'
        f'<position name="{n}_finger_r" joint="{n}_finger_r" kp="200" ctrlrange="0 {FINGER_MAX}" forcerange="-20 20"/>'
    )
    return equality, actuators


def object_xml(name: str, shape: str, rgba=(0.5, 0.5, 0.5)) -> str:
    gtype, size = SHAPES[shape]
    s = " ".join(f"{v:g}" for v in size)
    c = " ".join(f"{v:g}" for v in rgba)
    return f"""
    <body name="{name}" pos="0 0 {size[-1]}">
      <freejoint name="{name}"/>
      <geom name="{name}" type="{gtype}" size="{s}" rgba="{c} 1" mass="0.05" friction="1.5 0.01 0.001"/>
    </body>"""


def container_xml(name: str, half: float, wall: float, rgba) -> str:
    """An open box (base + 4 walls) as one mocap body (static; reset moves it via ``mocap_pos``)."""
    c = " ".join(f"{v:g}" for v in rgba)
    t = 0.005
    walls = []
    for sx, sy, px, py in ((t, half, half, 0), (t, half, -half, 0), (half, t, 0, half), (half, t, 0, -half)):
        walls.append(f'<geom type="box" size="{sx} {sy} {wall / 2}" pos="{px} {py} {wall / 2}" rgba="{c} 1"/>')
    return f"""
    <body name="{name}" mocap="true" pos="0 0 0">
      <geom name="{name}_base" type="box" size="{half} {half} 0.002" pos="0 0 0.002" rgba="{c} 1"/>
      {''.join(walls)}
    </body>"""


def build_scene(hands: list[HandSpec], bodies_xml: str, cameras_xml: str = "") -> str:
    eq, act = zip(*(_hand_extras(h) for h in hands))
    textures = []
    for i in range(NUM_TABLE_TEXTURES):
        # Fixed, distinct checker palettes; the randomizer picks one per env (via geom_matid).
        a, b = 0.25 + 0.08 * (i % 4), 0.45 + 0.05 * i
        textures.append(
            f'<texture name="table_tex{i}" type="2d" builtin="{"checker" if i % 2 == 0 else "gradient"}" '
            f'rgb1="{a:.2f} {0.3 + 0.05 * i:.2f} {b:.2f}" rgb2="{b:.2f} {a:.2f} {0.2 + 0.06 * i:.2f}" '
            f'width="64" height="64"/>'
            f'<material name="table_mat{i}" texture="table_tex{i}" texrepeat="{2 + i} {2 + i}"/>'
        )
    return f"""
<mujoco model="vla_rl_scene">
  <compiler angle="radian"/>
  <option timestep="{TIMESTEP}" integrator="{INTEGRATOR}" cone="elliptic" impratio="10"/>
  <visual><global offwidth="640" offheight="480"/><quality shadowsize="0"/></visual>
  <asset>{''.join(textures)}</asset>
  <default><geom condim="4" solref="{max(0.01, 2 * TIMESTEP)} 1"/></default>
  <worldbody>
    <light name="top" pos="0 0 1.5" dir="0 0 -1" diffuse="0.8 0.8 0.8" castshadow="false"/>
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.4" rgba="0.5 0.5 0.5 1"/>
    <geom name="table" type="box" size="0.45 0.5 0.02" pos="0 0 -0.02" material="table_mat0"/>
    <camera name="front" pos="0.75 0 0.45" xyaxes="0 1 0 -0.5 0 0.87" fovy="55"/>
    <camera name="top" pos="0 0 0.9" xyaxes="1 0 0 0 1 0" fovy="60"/>
    {cameras_xml}
    {''.join(_hand_xml(h) + (_arm_xml(h) if h.base else '') for h in hands)}
    {bodies_xml}
  </worldbody>
  <equality>{''.join(eq)}</equality>
  <actuator>{''.join(act)}</actuator>
</mujoco>"""
