"""The pure membership judgement (service/consumer/membership.py judge)."""

from __future__ import annotations

from service.consumer.membership import MembershipState, View, judge


def view(t: float, *, stable: bool = True, members: set[str] | None = None,
         me: str = "m1") -> View:
    return View(me, stable, None if members is None else frozenset(members), t)


def test_listed_and_stable_is_in_the_group() -> None:
    st = MembershipState()
    j = judge(st, view(0, members={"m1", "m2"}), patience_s=20)
    assert j.in_group and not j.rejoin


def test_not_listed_rejoins_after_two_checks_then_waits_a_patience() -> None:
    st = MembershipState()
    first = judge(st, view(0, members={"m2"}), patience_s=20)
    assert not first.in_group and not first.rejoin and "does not list" in first.why
    second = judge(st, view(1, members={"m2"}), patience_s=20)
    assert second.rejoin
    # A rejoin takes a rebalance: not asked again before the patience has passed.
    assert not judge(st, view(2, members={"m2"}), patience_s=20).rejoin
    assert not judge(st, view(3, members={"m2"}), patience_s=20).rejoin
    assert judge(st, view(25, members={"m2"}), patience_s=20).rejoin


def test_back_in_the_group_clears_the_out_state() -> None:
    st = MembershipState()
    judge(st, view(0, members={"m2"}), patience_s=20)
    assert st.out_since == 0
    assert judge(st, view(1, members={"m1", "m2"}), patience_s=20).in_group
    assert st.out_since is None and st.out_checks == 0


def test_a_join_in_progress_is_not_out() -> None:
    st = MembershipState()
    j = judge(st, view(0, stable=False, members={"m1"}), patience_s=20)
    assert j.in_group and not j.rejoin


def test_never_stable_for_the_patience_rejoins_even_without_the_broker() -> None:
    st = MembershipState()
    assert judge(st, view(0, stable=False), patience_s=20).in_group  # broker not asked
    j = judge(st, view(21, stable=False), patience_s=20)
    assert not j.in_group and j.rejoin and "not a stable group member" in j.why


def test_broker_unavailable_keeps_the_last_verdict_quietly() -> None:
    st = MembershipState()
    assert judge(st, view(0), patience_s=20).in_group
    j = judge(st, view(1, members={"m2"}), patience_s=20)
    assert not j.in_group
    assert not judge(st, view(2), patience_s=20).in_group  # still out, not forgotten


def test_not_joined_yet_is_joining_not_removed() -> None:
    st = MembershipState()
    j = judge(st, view(0, stable=False, members={"m2"}, me=""), patience_s=20)
    assert not j.in_group and not j.rejoin and j.why == "joining"
    assert not judge(st, view(1, stable=False, members={"m2"}, me=""), patience_s=20).rejoin
    late = judge(st, view(21, stable=False, members={"m2"}, me=""), patience_s=20)
    assert late.rejoin and "not joined for 21s" in late.why
