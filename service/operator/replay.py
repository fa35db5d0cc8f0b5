"""Replay: move the consumer group's committed offsets back, so the ERP is re-applied from
what Kafka holds.

Safe by construction: the group's offsets are reset only while the group has no members
(Kafka refuses to change offsets under a live group anyway; we check first and name the
members). The procedure is: stop the consumers, replay, start them again. Re-applying is
harmless: every ERP row keeps the source position of the change it reflects and never takes
an older one, and stock is recomputed, never incremented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kafka import TopicPartition
from kafka.admin import OffsetSpec, OffsetTimestamp
from kafka.errors import KafkaError

from service.errors import ConfigError, StackUnavailable, SyncError
from service.kafka_io import make_admin, make_consumer
from service.settings import Settings


class GroupActive(SyncError):
    """The consumer group has members: offsets cannot be reset under it."""


@dataclass
class PartitionPlan:
    topic: str
    partition: int
    committed: int | None
    new_offset: int
    end: int

    @property
    def to_reprocess(self) -> int:
        return max(0, self.end - self.new_offset)


@dataclass
class ReplayPlan:
    group: str
    topic: str
    target: str
    dry_run: bool
    partitions: list[PartitionPlan] = field(default_factory=list)
    # A dry run with consumers running: who would have to stop first.
    active_members: list[str] = field(default_factory=list)

    @property
    def to_reprocess(self) -> int:
        return sum(p.to_reprocess for p in self.partitions)


def parse_offsets(values: list[str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for value in values:
        part, sep, off = value.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(part)] = int(off)
        except ValueError as exc:
            raise ConfigError("--from-offset", f"expected PARTITION:OFFSET (e.g. 0:1200), "
                                               f"got {value!r}") from exc
        if out[int(part)] < 0:
            raise ConfigError("--from-offset", f"offset must be >= 0 in {value!r}")
    return out


def group_members(admin: Any, group: str) -> tuple[str, list[str]]:
    desc = admin.describe_groups([group]).get(group, {})
    members = [f"{m.get('client_id', '?')}@{m.get('client_host', '?')}"
               f" ({m.get('member_id', '?')})" for m in desc.get("members") or []]
    return str(desc.get("group_state", "Unknown")), members


def replay(settings: Settings, topic: str, *, from_beginning: bool = False,
           from_time: datetime | None = None, from_offsets: dict[int, int] | None = None,
           partitions: list[int] | None = None, dry_run: bool = False) -> ReplayPlan:
    if sum([from_beginning, from_time is not None, bool(from_offsets)]) != 1:
        raise ConfigError("replay", "give exactly one of --from-beginning, --from-time, "
                                    "--from-offset")
    known = {settings.sales_topic, settings.market_topic}
    if topic not in known:
        raise ConfigError("--topic", f"{topic!r} is not consumed by the group "
                                     f"{settings.consumer_group}: choose from "
                                     f"{', '.join(sorted(known))}")
    group = settings.consumer_group
    try:
        admin = make_admin(settings)
    except StackUnavailable:
        raise
    probe = make_consumer(settings, group_id=None)
    try:
        all_parts = sorted(probe.partitions_for_topic(topic) or ())
        if not all_parts:
            raise ConfigError("--topic", f"topic {topic!r} does not exist on the broker")
        wanted = partitions if partitions else all_parts
        if from_offsets:
            wanted = sorted(set(wanted) & set(from_offsets)) if partitions else \
                sorted(from_offsets)
        bad = sorted(set(wanted) - set(all_parts))
        if bad:
            raise ConfigError("--partition", f"{topic} has partitions {all_parts}, "
                                             f"not {bad}")
        tps = [TopicPartition(topic, p) for p in wanted]
        begin, end = probe.beginning_offsets(tps), probe.end_offsets(tps)
        specs: dict[TopicPartition, Any] = {}
        if from_beginning:
            target = "beginning"
            new = {tp: begin[tp] for tp in tps}
            specs = {tp: OffsetSpec.EARLIEST for tp in tps}
        elif from_time is not None:
            target = f"time {from_time.isoformat()}"
            ms = int(from_time.timestamp() * 1000)
            found = probe.offsets_for_times({tp: ms for tp in tps})
            new = {tp: found[tp].offset if found.get(tp) is not None else end[tp]
                   for tp in tps}
            specs = {tp: OffsetTimestamp(ms) for tp in tps}
        else:
            assert from_offsets is not None
            target = "offsets " + ", ".join(f"{p}:{o}" for p, o in sorted(from_offsets.items()))
            new = {tp: min(max(from_offsets[tp.partition], begin[tp]), end[tp]) for tp in tps}
            specs = {tp: new[tp] for tp in tps}
        committed = admin.list_group_offsets(group).get(group, {})
        plan = ReplayPlan(group, topic, target, dry_run, [
            PartitionPlan(topic, tp.partition,
                          committed[tp].offset if tp in committed else None, new[tp], end[tp])
            for tp in tps])
        state, members = group_members(admin, group)
        if dry_run:  # changes nothing, so it is allowed while consumers run
            plan.active_members = members
            return plan
        if members:
            raise GroupActive(
                f"consumer group {group} is {state} with {len(members)} member(s): "
                f"{'; '.join(members)}. Stop the consumers, replay, then start them again "
                "(offsets can only be reset while the group is empty)")
        result = admin.reset_group_offsets(group, specs)
        failed = {tp: r["error"] for tp, r in result.items()
                  if r["error"] is not None and r["error"].__name__ != "NoError"}
        if failed:
            raise GroupActive(f"the broker refused to reset offsets of {group}: " + ", ".join(
                f"{tp.topic}[{tp.partition}]: {err.__name__}" for tp, err in failed.items()))
        for p in plan.partitions:
            r = result.get(TopicPartition(p.topic, p.partition))
            if r is not None:
                p.new_offset = r["offset"]
        return plan
    except KafkaError as exc:
        raise StackUnavailable(f"Kafka at {settings.kafka_bootstrap}: "
                               f"{type(exc).__name__}: {exc}") from exc
    finally:
        probe.close()
        admin.close()
