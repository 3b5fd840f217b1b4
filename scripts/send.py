#!/usr/bin/env python3
"""Send one command to a jetfn function and print the reply.

    send.py <aggregate>.<id>.<command> '<json>' [--id COMMAND_ID] [--server URL]

The request goes to the NATS subject cmd.<aggregate>.<id>.<command>; --id sets
the Nats-Msg-Id header (the command id used for deduplication). The server is
--server, else $NATS_URL, else the URL `just dev` wrote to .jetfn/nats.url,
else nats://127.0.0.1:4222.

Exit status: 0 if the reply says "ok": true, 1 on an error reply, 2 if nobody
answered (no responders, timeout, no server) or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
URL_FILE = ROOT / ".jetfn" / "nats.url"
DEFAULT_URL = "nats://127.0.0.1:4222"
TIMEOUT_SECONDS = 5.0

try:
    import nats
    import nats.errors
except ImportError:
    print("send.py: installing nats-py (python3 -m pip install nats-py)", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "nats-py"],
        check=True,
    )
    import nats
    import nats.errors


class NoAnswer(Exception):
    """Nobody answered: no server, no responders or a timeout (exit 2)."""


def fail(message: str) -> NoReturn:
    print(f"send.py: {message}", file=sys.stderr)
    sys.exit(2)


def server_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    if URL_FILE.is_file():
        url = URL_FILE.read_text().strip()
        if url:
            return url
    return DEFAULT_URL


def subject_for(target: str) -> str:
    target = target.removeprefix("cmd.")
    parts = target.split(".")
    if len(parts) < 3 or any(not p for p in parts):
        fail(f"expected <aggregate>.<id>.<command> (e.g. account.alice.open), got {target!r}")
    return f"cmd.{target}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="send.py",
        description="Send a command to a jetfn function over NATS and print the reply.",
        epilog="example: send.py account.alice.open '{\"owner\":\"Alice\",\"initial_deposit\":100}'",
    )
    parser.add_argument("target", help="<aggregate>.<id>.<command>, e.g. account.alice.deposit")
    parser.add_argument("body", help="the command as JSON, e.g. '{\"amount\":50}'")
    parser.add_argument("--id", dest="command_id", help="command id, sent as the Nats-Msg-Id header")
    parser.add_argument("--server", help=f"NATS URL (default: $NATS_URL, .jetfn/nats.url, {DEFAULT_URL})")
    return parser.parse_args(argv)


async def send(url: str, subject: str, payload: bytes, command_id: str | None) -> bytes:
    async def quiet(_error: Exception) -> None:
        pass

    try:
        # nats-py keeps retrying an unreachable server in its connect loop
        # unless attempts are capped; the outer timeout bounds it for sure.
        nc = await asyncio.wait_for(
            nats.connect(
                url,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            ),
            timeout=TIMEOUT_SECONDS,
        )
    except asyncio.TimeoutError:
        raise NoAnswer(f"cannot connect to NATS at {url} within {TIMEOUT_SECONDS:g} s (is `just dev` running?)") from None
    except Exception as error:  # noqa: BLE001 - any failure to connect means "no server"
        raise NoAnswer(f"cannot connect to NATS at {url}: {str(error) or type(error).__name__} (is `just dev` running?)") from None
    try:
        headers = {"Nats-Msg-Id": command_id} if command_id else None
        try:
            reply = await nc.request(subject, payload, timeout=TIMEOUT_SECONDS, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoAnswer(f"no responders on {subject} at {url}: is the function running (`just dev`)?") from None
        except nats.errors.TimeoutError:
            raise NoAnswer(f"no reply on {subject} within {TIMEOUT_SECONDS:g} s (server {url})") from None
        return reply.data
    finally:
        await nc.close()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    subject = subject_for(args.target)
    try:
        json.loads(args.body)
    except json.JSONDecodeError as error:
        fail(f"the body is not valid JSON ({error}): {args.body}")
    url = server_url(args.server)

    try:
        data = asyncio.run(send(url, subject, args.body.encode(), args.command_id))
    except NoAnswer as error:
        fail(str(error))
    try:
        reply = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(data.decode(errors="replace"))
        print("send.py: the reply is not JSON", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    return 0 if isinstance(reply, dict) and reply.get("ok") is True else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
