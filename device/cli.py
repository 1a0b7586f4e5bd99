"""``classcap agent ...``: run the recording agent, check its config, press its button."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from device.config import DEFAULT_CONFIG_PATH, AgentConfig, load_agent_config
from shared.configfile import ConfigError

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def register(sub: Any) -> None:
    agent = sub.add_parser("agent", help="the recording agent that runs on each unit")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")

    def with_config(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"agent config file (default {DEFAULT_CONFIG_PATH})",
        )

    run = agent_sub.add_parser("run", help="run the agent until SIGTERM")
    with_config(run)
    run.set_defaults(handler=_run)

    check = agent_sub.add_parser("check-config", help="validate the config file and exit")
    with_config(check)
    check.set_defaults(handler=_check)

    press = agent_sub.add_parser("press", help="press a simulated unit's button")
    with_config(press)
    press.add_argument("kind", choices=["short", "long", "double"])
    press.set_defaults(handler=_press)

    status = agent_sub.add_parser("status", help="print a running agent's state as JSON")
    with_config(status)
    status.set_defaults(handler=_status)


def _load(path: Path) -> AgentConfig | None:
    try:
        return load_agent_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"classcap agent: {exc}\n")
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from device.agent import Agent
    from device.capture.base import CaptureError

    try:
        agent = Agent(config)
    except CaptureError as exc:
        sys.stderr.write(f"classcap agent: capture backend unusable: {exc}\n")
        return EXIT_FAILURE

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received, stopping", signal.Signals(signum).name)
        agent.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return agent.run()


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    sys.stdout.write(f"{args.config}: ok (device {config.device_id})\n")
    return 0


def _press(args: argparse.Namespace) -> int:
    from device.button import PressKind
    from device.control_socket import ControlError, send_press

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        send_press(config.system.control_socket, PressKind(args.kind))
    except ControlError as exc:
        sys.stderr.write(f"classcap agent press: {exc}\n")
        return EXIT_FAILURE
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from device.control_socket import ControlError, query_status

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        state = query_status(config.system.control_socket)
    except ControlError as exc:
        sys.stderr.write(f"classcap agent status: {exc}\n")
        return EXIT_FAILURE
    sys.stdout.write(json.dumps(state, indent=2, default=str) + "\n")
    return 0
