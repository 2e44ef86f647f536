"""Argument definitions of ``vla-rl export`` and ``vla-rl serve``, shared by ``vla_rl/cli.py`` and
``python -m vla_rl.deploy.server``; torch-free, so building the parser is cheap."""

from __future__ import annotations


def hold_rule(text: str):
    """One ``--hold`` entry: "zero", "last" or a number."""
    return text if text in ("zero", "last") else float(text)


def add_export_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="policy directory written by save_pretrained (e.g. a training run's policy/)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--denoising-steps", type=int, default=None, help="K (default: the policy's noise.sample_steps)")
    parser.add_argument("--exec-steps", type=int, default=None, help="actions executed per chunk (default: the policy's)")
    parser.add_argument("--control-hz", type=float, default=None,
                        help="control rate in the manifest (default: the task's, else 10)")
    parser.add_argument("--task", default=None,
                        help="env spec of the task the policy acts in (a task name, gym:<id> or module:factory): its "
                             "action space gives the default bounds, the hold and the control rate "
                             "(default: the env of the training run that wrote the checkpoint)")
    parser.add_argument("--action-low", type=float, nargs="+", default=None,
                        help="safety bounds (scalar or per dim; default: the task's action space, else the demo range)")
    parser.add_argument("--action-high", type=float, nargs="+", default=None)
    parser.add_argument("--max-delta", type=float, nargs="+", default=None, help="max per-step action change")
    parser.add_argument("--hold", type=hold_rule, nargs="+", default=None,
                        help="what the safety filter sends on a fault, one rule or one per action dim: zero (delta "
                             "control: no motion), last (absolute control: the last command) or a number "
                             "(default: the task's declared hold; required when the task is unknown)")
    parser.add_argument("--hold-action", type=float, nargs="+", default=None, help="fixed hold values (same as --hold numbers)")
    parser.add_argument("--watchdog-timeout", type=float, default=0.5, help="seconds; <= 0 disables")
    parser.add_argument("--require-timestamp", action="store_true", help="hold on observations without a timestamp")
    parser.add_argument("--deterministic", action="store_true", help="export the eta=0 / ODE chain")
    parser.add_argument("--torchscript", action="store_true", help="also write a TorchScript artifact")
    parser.add_argument("--torch-export", action="store_true", help="also write a torch.export program (policy.pt2)")


def add_serve_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `vla-rl export`, or a policy directory "
                                       "(save_pretrained) to serve with torch, e.g. one with a VLM backbone")
    parser.add_argument("--task", default=None, help="policy directory only: the task whose action space gives the "
                                                     "bounds, hold and control rate (default: the training run's)")
    parser.add_argument("--hold", type=hold_rule, nargs="+", default=None,
                        help="policy directory only: zero|last|number per action dim (default: the task's)")
    parser.add_argument("--device", default="cpu", help="policy directory only: torch device of the policy")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None,
                        help="require this token in hello; prefer the VLA_RL_SERVE_TOKEN environment variable "
                             "(a command-line token shows in `ps`)")
    parser.add_argument("--max-message-bytes", type=int, default=8 << 20, help="largest request after hello")
    parser.add_argument("--max-hello-bytes", type=int, default=16 << 10,
                        help="largest message before the token is accepted")
    parser.add_argument("--hello-timeout", type=float, default=5.0, help="seconds a connection has to send its hello")
    parser.add_argument("--max-connections", type=int, default=32, help="connections served at once")
    parser.add_argument("--max-instruction-chars", type=int, default=1024,
                        help="longer instructions are held without being tokenized")
    parser.add_argument("--mode", choices=["queue", "ensemble"], default="queue")
    parser.add_argument("--noise", choices=["random", "zeros"], default="random")
    parser.add_argument("--seed", type=int, default=0)
