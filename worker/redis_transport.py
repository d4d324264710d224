"""Two fixes to kombu's Redis transport, both seen in tests/test_faults.py on a Redis restart.

1. kombu pops a message (BRPOP) and then, in a second command, records it as unacked.
   If Redis goes away between the two, kombu raises and the popped message, now in no
   Redis key at all, is silently dropped (celery/kombu#305). Here the message is handed
   to the worker anyway: it runs once, like any other, only without the redelivery
   record for the rare case that the worker also dies before finishing it.
2. When the connection drops, closing the channel hands its unacked messages back to
   the queue. With Redis away that cannot work, and kombu 5.7 can even fail with an
   AttributeError (its transport already detached), which Celery treats as
   unrecoverable: the worker exits instead of reconnecting. Those messages are still
   in Redis's unacked hash, so the visibility sweep restores them later; here the
   failure is logged and the worker goes on to reconnect.
3. The same goes for acking, after the reconnect, a job received on the closed channel:
   it is logged, and the message runs again after the visibility timeout (the result
   is the same; the cache issue's idempotency keeps it from being charged twice).

Not fixable here: if Redis is killed (SIGKILL, power loss) after it popped a message
and fsynced that, but before its reply reached the worker, the message is gone. A clean
restart (SIGTERM) sends the reply first. Closing that gap needs a reliable-queue pop
(BLMOVE into a processing list), which kombu's Redis transport does not have.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

logger = logging.getLogger("llmq")


class OutageSafeQoS(kombu_redis.QoS):
    """kombu's Redis QoS, which no longer drops a message it could not record."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Record the message as unacked; if Redis is gone, deliver it unrecorded."""
        try:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning(
                "Redis went away while recording message %s as unacked (%s): running it "
                "anyway rather than dropping it",
                delivery_tag,
                exc,
            )
            # kombu's own bookkeeping, so acking it later is harmless.
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> None:
        """Hand unacked messages back now; if Redis is gone, leave them to the sweep."""
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, AttributeError) as exc:
            logger.warning(
                "could not hand back %d unacked message(s) while the connection is down "
                "(%r); the visibility-timeout sweep will restore them",
                len(self._delivered),
                exc,
            )

    def ack(self, delivery_tag: Any) -> None:
        """Ack; a message of a channel closed by a lost connection is left to the sweep."""
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, AttributeError) as exc:
            logger.warning(
                "could not ack message %s, its connection was lost (%r): it will run "
                "again after the visibility timeout",
                delivery_tag,
                exc,
            )


def install() -> None:
    """Use OutageSafeQoS for every Redis channel (redis://, rediss://, sentinel://)."""
    kombu_redis.Channel.QoS = OutageSafeQoS
