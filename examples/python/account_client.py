#!/usr/bin/env python3
"""A jetfn client in Python, written from docs/protocol.md alone.

It opens a new account, deposits, tries to withdraw more than the balance (and handles the
`rejected` reply), withdraws a smaller amount, then waits until the Redis read model has caught
up with its last command (the consistency token) and checks the balance there.

    NATS_URL=nats://127.0.0.1:4222 REDIS_URL=redis://127.0.0.1:6379 python3 account_client.py

Needs the account command function and the account-balances projection running (`just dev`), and
`python3 -m pip install -r examples/python/requirements.txt`.

Exit status: 0 when everything behaved as the protocol says, 1 when something did not (the
message says what), 2 when a dependency or a server is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

try:
    import nats
    import nats.errors
    import redis.asyncio as aioredis
except ImportError as missing:
    print(
        f"account_client: missing Python package ({missing}); install with: "
        "python3 -m pip install -r examples/python/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
AGGREGATE = "account"  # protocol P1/P35: subject token and service name
PROJECTION = "account-balances"  # protocol section 7
REQUEST_TIMEOUT = 5.0  # seconds, the suggested client policy of section 3
MAX_ATTEMPTS = 6
READ_MODEL_DEADLINE = 10.0  # seconds to wait for the read model


class Failed(Exception):
    """Something did not behave as the protocol says (exit 1)."""


class Unreachable(Exception):
    """A server could not be reached (exit 2)."""


@dataclass
class Reply:
    """A command reply (protocol section 2)."""

    body: dict[str, Any]
    error_code: str | None  # Nats-Service-Error-Code header (P24)

    @property
    def ok(self) -> bool:
        return self.body.get("ok") is True

    @property
    def kind(self) -> str | None:
        return None if self.ok else self.body["error"]["kind"]

    @property
    def message(self) -> str:
        return "" if self.ok else self.body["error"]["message"]


async def send(nc: Any, account_id: str, command: str, body: dict[str, Any]) -> Reply:
    """Sends one command with a fresh command id (P14), resending it with the same id after a
    timeout, no responders, `conflict` or `unavailable` (P25, P27, P34)."""
    subject = f"cmd.{AGGREGATE}.{account_id}.{command}"
    headers = {"Nats-Msg-Id": str(uuid.uuid4())}
    payload = json.dumps(body).encode()
    pause = 0.05
    last_problem = ""
    for _attempt in range(MAX_ATTEMPTS):
        try:
            msg = await nc.request(subject, payload, timeout=REQUEST_TIMEOUT, headers=headers)
        except nats.errors.NoRespondersError:
            last_problem = f"no responders on {subject}: is the account function running?"
        except nats.errors.TimeoutError:
            last_problem = f"no reply on {subject} within {REQUEST_TIMEOUT}s"
        else:
            try:
                reply_body = json.loads(msg.data)
            except ValueError as err:
                raise Failed(f"{subject}: reply is not JSON ({err}): {msg.data!r}") from err
            check_reply_shape(subject, reply_body)
            reply = Reply(reply_body, (msg.headers or {}).get("Nats-Service-Error-Code"))
            check_error_header(subject, reply)
            if reply.kind not in ("conflict", "unavailable"):
                return reply
            last_problem = f"{reply.kind}: {reply.message}"
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)
    raise Failed(f"{subject}: gave up after {MAX_ATTEMPTS} attempts; last: {last_problem}")


CODES = {"invalid": "400", "rejected": "422", "conflict": "409", "unavailable": "503"}


def check_reply_shape(subject: str, body: Any) -> None:
    """P18 and P23: the exact fields of both reply shapes."""
    if not isinstance(body, dict):
        raise Failed(f"{subject}: reply is not a JSON object: {body!r}")
    if body.get("ok") is True:
        if set(body) != {"ok", "id", "version", "seq", "events"}:
            raise Failed(f"{subject}: unexpected success reply fields: {body!r}")
    elif body.get("ok") is False:
        error = body.get("error")
        if set(body) != {"ok", "error"} or not isinstance(error, dict):
            raise Failed(f"{subject}: unexpected failure reply: {body!r}")
        if set(error) != {"kind", "message"} or error["kind"] not in CODES:
            raise Failed(f"{subject}: unexpected error object: {error!r}")
    else:
        raise Failed(f"{subject}: reply without a boolean ok: {body!r}")


def check_error_header(subject: str, reply: Reply) -> None:
    """P24: failures carry their code in a header; successes carry none (P18)."""
    expected = None if reply.ok else CODES[reply.kind or ""]
    if reply.error_code != expected:
        raise Failed(
            f"{subject}: Nats-Service-Error-Code is {reply.error_code!r}, expected {expected!r}"
        )


def expect_ok(what: str, reply: Reply, events: list[str]) -> tuple[int, int]:
    if not reply.ok:
        raise Failed(f"{what}: expected success, got {reply.kind} ({reply.message})")
    if reply.body["events"] != events:
        raise Failed(f"{what}: events {reply.body['events']}, expected {events}")
    version, seq = reply.body["version"], reply.body["seq"]
    print(f"{what}: ok, version {version}, seq {seq}, events {', '.join(events)}")
    return version, seq


async def wait_for_read_model(r: Any, token: int) -> int:
    """Section 8: poll the live version and its checkpoint hash until every partition's
    checkpoint has reached the token. Returns the live version G."""
    deadline = time.monotonic() + READ_MODEL_DEADLINE
    pause = 0.001
    seen = "nothing yet"
    while True:
        generation = await r.get(f"{{{PROJECTION}}}:active")
        if generation is not None:
            checkpoint = await r.hgetall(f"{{{PROJECTION}}}:g{generation}:checkpoint")
            partitions = checkpoint.get("partitions")
            if partitions is not None:
                least = min(int(checkpoint.get(f"p{k}", 0)) for k in range(int(partitions)))
                seen = f"version {generation}, least checkpoint {least} of {partitions} partition(s)"
                if least >= token:
                    print(f"read model {PROJECTION}: {seen} >= token {token}")
                    return int(generation)
        if time.monotonic() >= deadline:
            raise Failed(
                f"read model {PROJECTION} did not reach seq {token} within "
                f"{READ_MODEL_DEADLINE}s ({seen}): is the projection running?"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def run() -> None:
    errors: list[Exception] = []

    async def record_error(err: Exception) -> None:  # instead of nats-py's tracebacks
        errors.append(err)

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                NATS_URL,
                connect_timeout=3,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=record_error,
            ),
            timeout=10,
        )
    except Exception as err:  # nats-py raises several types here
        cause = errors[-1] if errors else err
        raise Unreachable(f"cannot connect to NATS at {NATS_URL}: {cause!r}") from err
    r = aioredis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=5)
    try:
        try:
            await r.ping()
        except Exception as err:
            raise Unreachable(f"cannot connect to Redis at {REDIS_URL}: {err}") from err
        await scenario(nc, r)
    finally:
        await nc.close()
        if hasattr(r, "aclose"):  # redis-py >= 5.0.1
            await r.aclose()
        else:
            await r.close()


async def scenario(nc: Any, r: Any) -> None:
    account_id = f"py-{uuid.uuid4().hex[:16]}"  # P4: [A-Za-z0-9_-]{1,128}
    print(f"account {account_id} (NATS {NATS_URL}, Redis {REDIS_URL})")

    opened = await send(nc, account_id, "open", {"owner": "Py Client", "initial_deposit": 1000})
    version, _ = expect_ok("open with 1000", opened, ["AccountOpened", "MoneyDeposited"])
    if version != 2:
        raise Failed(f"open with an initial deposit: version {version}, expected 2 (P20)")

    deposited = await send(nc, account_id, "deposit", {"amount": 250})
    expect_ok("deposit 250", deposited, ["MoneyDeposited"])

    # Too much: the domain says no. A rejection is an answer, not an error to retry (P25).
    refused = await send(nc, account_id, "withdraw", {"amount": 5000})
    if refused.ok or refused.kind != "rejected":
        raise Failed(f"withdraw 5000 from 1250: expected a rejected reply, got {refused.body}")
    print(
        f"withdraw 5000: rejected as expected (code {refused.error_code}): {refused.message}"
    )

    withdrawn = await send(nc, account_id, "withdraw", {"amount": 200})
    version, token = expect_ok("withdraw 200", withdrawn, ["MoneyWithdrawn"])

    generation = await wait_for_read_model(r, token)
    account = await r.hgetall(f"{{{PROJECTION}}}:g{generation}:account:{account_id}")
    expected = {
        "owner": "Py Client",
        "balance": "1050",
        "status": "open",
        "version": str(version),
    }
    actual = {field: account.get(field) for field in expected}
    if actual != expected:
        raise Failed(f"read model account {account_id}: {account}, expected {expected}")
    if int(account.get("seq", 0)) < token:  # P62: the shortcut agrees
        raise Failed(f"read model account {account_id}: seq {account.get('seq')} < token {token}")
    print(f"balance in Redis: {account['balance']} (expected 1050)")


def main() -> NoReturn:
    try:
        asyncio.run(run())
    except Failed as err:
        print(f"account_client: FAILED: {err}", file=sys.stderr)
        sys.exit(1)
    except Unreachable as err:
        print(f"account_client: {err}", file=sys.stderr)
        sys.exit(2)
    print("OK: the account client worked as docs/protocol.md says")
    sys.exit(0)


if __name__ == "__main__":
    main()
