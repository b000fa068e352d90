"""What runs after a spend: balance and limit alerts, and auto top-up.

Auto top-up keeps the pool (where its purchases land) at or above a threshold, one purchase at
a time. The latch is the `armed` flag: the spend that sees the pool under the threshold claims
the purchase with `UPDATE ... SET armed = false WHERE armed`, recording when and for which pack
(`claimed_at`, `claimed_pack_id`); a concurrent spend waits on that row, then finds it disarmed
and does nothing. The claim commits before the payment provider is asked, outside any
transaction, under a payment reference unique to that claim (`auto-topup:{workspace}:{sequence}`),
and the credits go through the same purchase path as a manual purchase. The outcome settles the
claim and re-arms the latch, so the next spend that leaves the pool under the threshold buys
again (a pack too small to lift it buys again at the next spend, within the monthly caps). A pool
can also drop under the threshold with no spend to see it (credits expired, or moved to a seat or
a group), and then be too low for the next generation, whose refusal is no spend either: a start
refused for insufficient credits claims the same way, and so does the server's scheduler tick
(`buy_due_top_ups`), so a pool that ran dry does not wait for someone to buy by hand.

The latch is off exactly while a claim is in flight, and nothing but its outcome re-arms it (not
the pool seen back over the threshold, not turning auto top-up back on): re-armed early, the next
claim would ask under a new reference while the first may still be paid. What makes that safe is
that a claim whose outcome never comes (the process died while the provider was asked, or the
outcome's transaction failed after the provider confirmed) is not left in flight for good: after
`CLAIM_TIMEOUT`, the next spend, or the scheduler's tick for a workspace that no longer spends,
takes it over with a conditional UPDATE that one of them wins, and asks again under the SAME
reference for the SAME pack. A provider that took the first payment answers that reference "paid"
without charging again, and the purchase is recorded, and counted in the month, once per
reference whoever records it (`run_top_up`). A provider that does not answer counts as a failed
attempt, and the next attempt likewise asks under the same reference, for the same pack
(`unanswered_pack_id`).

The settings (on or off, threshold, caps, pack) decide whether a NEW purchase starts; a purchase
that has started and may have been paid is finished whatever they say by then. Auto top-up turned
off (by its owner, or after repeated failures) while a claim was abandoned, or after a payment
went unanswered, no longer leaves a charge the ledger never shows: the scheduler takes the claim
over (or asks the unanswered payment again) for a workspace whose auto top-up is off, where no
spend looks; the provider's answer records the credits, or closes the claim as failed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, authorized_lock, parse_id
from domain.clock import Clock
from domain.db import Database
from domain.errors import NotFound, ValidationFailed
from domain.governance import alerts, audit
from domain.governance import limits
from domain.governance.limits import approved_extra, period_ends
from domain.governance.models import Alert, AlertStatus, AutoTopUp, LimitPeriod, LimitUsage
from domain.governance.rules import Period, in_progress, moved_by_change
from domain.ledger.models import CreditPack, Grant, GrantSource, Purchase, Scope
from domain.ledger.payments import PaymentOutcome, PaymentProvider, PaymentRequest, auto_top_up_reference
from domain.money import format_credits, parse_credits
from domain.periods.renewal import allowance_pieces, is_period_allowance, renewal
from domain.periods.rules import NOTHING_ROLLS_OVER, Renewal
from domain.workspaces.models import Workspace
from policies import Action

GRANTS = Grant.__table__
log = logging.getLogger("creditpool.automation")

# The subjects of auto top-up's TOPUP_FAILED alerts, one open alert each. A payment that failed
# (declined, or not answered) is a fact about the purchases made, with a count that grows until
# one goes through; a pack off sale is a fact about the settings, which the owner clears by
# picking another pack. Under one subject, either would hide the other's state.
PAYMENT_FAILED = "auto-topup"
PACK_OFF_SALE = "auto-topup:pack-off-sale"


async def available_units(session: AsyncSession, ws_id: uuid.UUID, now: datetime, *,
                          pool_only: bool = False) -> int:
    """Credits spendable now, held ones excluded: in the whole workspace (every scope, as
    `balance.available` and the low-balance alert count them), or in the pool only (what auto
    top-up keeps over its threshold: its purchases land there, and seat or group credits may be
    out of reach of the spends that need them)."""
    return int((await session.execute(_spendable(ws_id, now, pool_only=pool_only))).scalar_one())


def _spendable(workspace, now: datetime, *, pool_only: bool) -> Select:
    """The sum behind `available_units`, for a workspace id or a column to correlate with."""
    where = [GRANTS.c.workspace_id == workspace, GRANTS.c.remaining > 0, GRANTS.c.effective_at <= now,
             or_(GRANTS.c.expires_at.is_(None), GRANTS.c.expires_at > now)]
    if pool_only:
        where.append(GRANTS.c.scope == Scope.WORKSPACE)
    return select(func.coalesce(func.sum(GRANTS.c.remaining), 0)).where(*where)


# How long a claim waits for its outcome before it counts as abandoned (its process died while
# the provider was asked, or recording the outcome failed) and is taken over. Far longer than a
# payment call and one transaction take; and a slow attempt taken over all the same is harmless:
# it still records a payment the provider confirms (the reference is the purchase's key) but no
# longer owns the latch, so it neither counts that purchase twice nor re-arms over the take-over.
CLAIM_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class TopUpClaim:
    workspace_id: uuid.UUID
    sequence: int
    pack_id: uuid.UUID
    claimed_at: datetime  # with the sequence, tells this attempt from a later take-over of it
    taken_over: bool = False  # continues an abandoned claim (same sequence, same pack)
    retry: bool = False  # asks again for an unanswered payment (same reference, same pack)

    @property
    def reference(self) -> str:
        return auto_top_up_reference(self.workspace_id, self.sequence)

    def owns(self, topup: AutoTopUp) -> bool:
        """Still the claim in flight: neither settled nor taken over since."""
        return not topup.armed and topup.sequence == self.sequence and topup.claimed_at == self.claimed_at


def needs_after_spend(auto_topup_enabled: bool, low_balance_alert_units: int | None, charges: list[dict]) -> bool:
    """From the workspace row the spend already read: nothing runs for a workspace with no low
    balance alert, no auto top-up and no limit charged."""
    return auto_topup_enabled or low_balance_alert_units is not None or bool(charges)


async def after_spend(db: Database, clock: Clock, provider: PaymentProvider | None, ws_id: uuid.UUID,
                      charges: list[dict]) -> None:
    """Alerts and auto top-up after a spend that has committed, or a start refused for want of
    credits. It never raises: the spend's answer is what was committed (or the refusal), and a
    failure here (the database busy or gone) is logged. An evaluation that fails changes nothing
    (it is one transaction): the next spend evaluates again from the same state."""
    try:
        now = clock.now()
        claim = await db.transaction(lambda s: _evaluate(s, ws_id, charges, now))
        if claim is not None and provider is not None:
            await run_top_up(db, provider, claim, now)
    except Exception:
        log.exception("alerts and auto top-up after a spend in workspace %s failed", ws_id)


async def _evaluate(session: AsyncSession, ws_id: uuid.UUID, charges: list[dict], now: datetime) -> TopUpClaim | None:
    ws = await session.get_one(Workspace, ws_id)
    available = await available_units(session, ws_id, now)
    await _low_balance(session, ws, available, now)
    for c in charges:
        await _limit_alerts(session, ws_id, uuid.UUID(c["limit"]), datetime.fromisoformat(c["period"]), now)
    if not ws.auto_topup_enabled:
        return None
    return await claim_top_up(session, ws, now)


async def claim_top_up(session: AsyncSession, ws: Workspace, now: datetime, *,
                       decide_again: bool = True) -> TopUpClaim | None:
    """Claim the purchase the pool needs now, if any. The claim is one conditional UPDATE, so of
    concurrent spends, refusals and schedulers exactly one gets it; it commits with the caller's
    transaction, before the provider is asked (`run_top_up`).

    Two kinds of purchase are claimed. One already started that may have been paid and whose
    outcome is not recorded (a claim abandoned in flight, or an attempt the provider did not
    answer) is finished under its own reference, for its own pack, whatever the settings say by
    now: auto top-up turned off, the threshold or the caps lowered, the pool back over the
    threshold. The settings decide whether a purchase starts, and this one has: the customer
    may have been charged for it. A NEW purchase is claimed only while auto top-up is on, the
    pool under the threshold, the pack on sale and the monthly caps not reached: as the settings
    are when the latch flips. They are read without a lock, so the UPDATE also requires them (and
    the month's counts) unchanged; a change committed in between (`set_auto_top_up` saved while
    this spend decided) makes it decide once more, under the new settings, rather than buy under
    settings its owner was told were replaced."""
    topup = await session.get(AutoTopUp, ws.id)
    if topup is None:
        return None
    if not topup.armed:  # a claim is in flight
        if topup.claimed_at > now - CLAIM_TIMEOUT:
            return None  # its outcome will settle it and re-arm the latch
        # No outcome in time: its process died, or recording the outcome failed.
        return await _take_over(session, topup, now)
    if topup.unanswered_pack_id is not None:
        # The retry of an unanswered payment asks under the same reference for the pack it asked
        # for, even one taken off sale since: the first attempt may have been paid, and this
        # completes that purchase. While auto top-up is on, the next spend asks (`_due` leaves
        # retries to spends); while it is off, no spend looks, and the scheduler asks.
        pack = await session.get_one(CreditPack, topup.unanswered_pack_id)
        condition = AutoTopUp.unanswered_pack_id == pack.id
    else:
        if not topup.enabled or await _pool_over_threshold(session, topup, now):
            return None
        pack = await session.get_one(CreditPack, topup.pack_id)
        if not pack.is_active:  # never buy what is no longer on sale
            await alerts.fire(session, ws.id, alerts.TOPUP_FAILED, PACK_OFF_SALE, now, refresh=True,
                              reason="the pack is off sale", packId=str(pack.id))
            return None
        # A claim's purchase is counted when it is recorded, once per reference (`run_top_up`).
        if cap_reached(topup, pack.units, now, ws.timezone):
            purchases, units = this_month(topup, now, ws.timezone)
            await alerts.fire(session, ws.id, alerts.TOPUP_CAP_REACHED,
                              topup_month(now, ws.timezone, topup).start.isoformat(), now,
                              purchases=purchases, credits=format_credits(units))
            return None
        # Room for this purchase: a cap alert of an earlier month, or of caps raised since, no longer holds.
        await alerts.resolve(session, ws.id, alerts.TOPUP_CAP_REACHED, now)
        condition = and_(AutoTopUp.enabled, AutoTopUp.unanswered_pack_id.is_(None), *_as_decided(topup))
    claimed = (await session.execute(
        update(AutoTopUp).where(AutoTopUp.workspace_id == ws.id, AutoTopUp.armed, condition)
        .values(armed=False, sequence=AutoTopUp.sequence + 1, claimed_at=now, claimed_pack_id=pack.id)
        .returning(AutoTopUp.sequence, AutoTopUp.claimed_at)
    )).first()
    if claimed is None:
        if decide_again and topup.unanswered_pack_id is None:
            await session.refresh(topup)
            if topup.armed:  # not claimed by another: the settings changed meanwhile, decide under them
                return await claim_top_up(session, ws, now, decide_again=False)
        return None  # a concurrent spend (or scheduler) claimed this purchase
    return TopUpClaim(ws.id, claimed.sequence, pack.id, claimed.claimed_at,
                      retry=topup.unanswered_pack_id is not None)


def _as_decided(topup: AutoTopUp) -> tuple:
    """The settings and month counts a new purchase was decided on, as read."""
    return (AutoTopUp.pack_id == topup.pack_id, AutoTopUp.threshold_units == topup.threshold_units,
            AutoTopUp.monthly_max_purchases == topup.monthly_max_purchases,
            AutoTopUp.monthly_max_units == topup.monthly_max_units,
            AutoTopUp.purchases_this_month == topup.purchases_this_month,
            AutoTopUp.units_this_month == topup.units_this_month,
            AutoTopUp.month_start.is_not_distinct_from(topup.month_start))


async def _pool_over_threshold(session: AsyncSession, topup: AutoTopUp, now: datetime) -> bool:
    return await available_units(session, topup.workspace_id, now, pool_only=True) >= topup.threshold_units


async def _take_over(session: AsyncSession, topup: AutoTopUp, now: datetime) -> TopUpClaim | None:
    """Continue an abandoned claim: same sequence (so the same payment reference), same pack,
    whatever is configured or on sale now, and whether or not auto top-up is still on, the pool
    still under the threshold or the caps still open (`claim_top_up`): the first attempt may have
    been paid. Its purchase still counts in the month once, when it is recorded (`run_top_up`).
    Only the claim's time moves, which is what makes this conditional: of two take-overs racing,
    the second waits on the row, then finds `claimed_at` changed and takes nothing."""
    claimed = (await session.execute(
        update(AutoTopUp).where(AutoTopUp.workspace_id == topup.workspace_id, ~AutoTopUp.armed,
                                AutoTopUp.sequence == topup.sequence, AutoTopUp.claimed_at == topup.claimed_at)
        .values(claimed_at=now).returning(AutoTopUp.sequence, AutoTopUp.claimed_at)
    )).first()
    if claimed is None:
        return None  # a concurrent spend (or scheduler) took it over, or its outcome came
    log.warning("auto top-up auto-topup:%s:%s claimed at %s has no recorded outcome: taken over under the same "
                "reference%s", topup.workspace_id, topup.sequence, topup.claimed_at.isoformat(),
                "" if topup.enabled else " (auto top-up is off: this purchase was started before)")
    return TopUpClaim(topup.workspace_id, claimed.sequence, topup.claimed_pack_id, claimed.claimed_at,
                      taken_over=True)


def topup_month(now: datetime, timezone: str, topup: AutoTopUp) -> Period:
    """The auto top-up month in progress; the top-up's month is the one last counted in. Like a
    spend limit's period, a change of timezone does not reset it (its cap carries on) but moves
    its end to the new calendar (`follow_timezone`)."""
    latest = Period(topup.month_start, topup.month_end) if topup.month_start is not None else None
    return in_progress(LimitPeriod.MONTH, now, timezone, latest)


def this_month(topup: AutoTopUp, now: datetime, timezone: str) -> tuple[int, int]:
    """Purchases and credits bought in the month in progress: the stored counts are those of the
    month last counted in, which may be over."""
    if topup.month_start is not None and topup_month(now, timezone, topup).start == topup.month_start:
        return topup.purchases_this_month, topup.units_this_month
    return 0, 0


def cap_reached(topup: AutoTopUp, pack_units: int, now: datetime, timezone: str) -> bool:
    """Whether one more purchase of `pack_units` would pass a monthly cap in the month in progress."""
    purchases, units = this_month(topup, now, timezone)
    return purchases + 1 > topup.monthly_max_purchases or units + pack_units > topup.monthly_max_units


@dataclass(frozen=True, slots=True)
class TopUpView:
    topup: AutoTopUp
    purchases_this_month: int
    units_this_month: int


async def follow_timezone(session: AsyncSession, ws_id: uuid.UUID, timezone: str, now: datetime) -> None:
    """The workspace's timezone changes: its limit periods and its auto top-up month in progress
    end at the new calendar's nearest boundary, unless it is already behind (`rules.moved_by_change`)."""
    await limits.follow_timezone(session, ws_id, timezone, now)
    # Locked: a top-up recording its purchase may be starting a new month at this moment.
    topup = await session.get(AutoTopUp, ws_id, with_for_update=True)
    if topup is not None and topup.month_start is not None:
        moved = moved_by_change(LimitPeriod.MONTH, Period(topup.month_start, topup.month_end), timezone, now)
        if moved is not None:
            topup.month_end = moved.end


async def _low_balance(session: AsyncSession, ws: Workspace, available: int, now: datetime) -> int:
    """Fire or resolve the low-balance alert for `available` credits; how many alerts changed."""
    if ws.low_balance_alert_units is None:
        return 0
    if available < ws.low_balance_alert_units:
        return await alerts.fire(session, ws.id, alerts.LOW_BALANCE, "workspace", now,
                                 available=format_credits(available), threshold=format_credits(ws.low_balance_alert_units))
    return await alerts.resolve(session, ws.id, alerts.LOW_BALANCE, now, "workspace")


async def _limit_alerts(session: AsyncSession, ws_id: uuid.UUID, limit_id: uuid.UUID, period: datetime,
                        now: datetime) -> int:
    """A limit's 80 % and 100 % alerts for the period starting at `period`, as its usage and
    allowance are now; how many fired or resolved."""
    from domain.governance.models import SpendLimit

    limit = await session.get(SpendLimit, limit_id)
    used, allowance = await _usage_of(session, limit, period, now)
    subject = _limit_subject(limit_id, period)
    changed = 0
    for kind, share in ((alerts.LIMIT_100, 100), (alerts.LIMIT_80, 80)):
        if limit.removed_at is None and allowance and used * 100 >= allowance * share:
            changed += await alerts.fire(session, ws_id, kind, subject, now, limitId=str(limit_id),
                                         used=format_credits(used), limit=format_credits(allowance))
        else:
            changed += await alerts.resolve(session, ws_id, kind, now, subject)
    return changed


def _limit_subject(limit_id: uuid.UUID, period: datetime) -> str:
    return f"{limit_id}:{period.isoformat()}"


async def _usage_of(session: AsyncSession, limit, period: datetime, now: datetime) -> tuple[int, int]:
    """A limit's usage in the period starting at `period`, and its allowance then (the limit
    plus the approved overages in force): the figures its 80 % and 100 % alerts compare."""
    used = (await session.execute(select(LimitUsage.used_units).where(
        LimitUsage.limit_id == limit.id, LimitUsage.period_start == period))).scalar_one_or_none() or 0
    return used, limit.amount_units + await approved_extra(session, limit.id, period, now)


async def limit_changed(session: AsyncSession, limit, now: datetime, period: datetime | None = None) -> None:
    """A limit was set, changed, removed or raised by an approval (`period`: the approval's; by
    default the period in progress): its 80 % and 100 % alerts follow at once, as a spend's do. A
    limit set where the period has already spent 90 % fires; one raised, or an approval, that
    brings usage back under resolves; a removed one resolves. (Before, they waited for the next
    spend or the scheduler's round, and a new limit already crossed never fired until a spend.)"""
    if period is None:
        ws = await session.get_one(Workspace, limit.workspace_id)
        period = (await limits.current_period(session, limit.id, limit.period, now, ws.timezone)).start
    await _limit_alerts(session, limit.workspace_id, limit.id, period, now)


async def run_top_up(db: Database, provider: PaymentProvider, claim: TopUpClaim, now: datetime) -> bool:
    """Ask the provider for the claimed purchase, outside any transaction, then record the
    outcome, which settles the claim and re-arms the latch. If this never finishes (the process
    dies, the outcome's transaction fails) the claim stays in flight and is taken over after
    `CLAIM_TIMEOUT` under the same reference (`claim_top_up`)."""
    from domain.ledger.service import record_purchase  # the ledger calls this module after a spend

    pack = await db.read(lambda s: s.get_one(CreditPack, claim.pack_id))
    reference = claim.reference
    unanswered = False
    try:
        outcome = await provider.confirm(PaymentRequest(reference=reference, amount_minor=pack.price_minor,
                                                        currency=pack.currency,
                                                        description=f"auto top-up: {pack.name}"))
    except Exception:
        # No answer (a timeout, a refused connection): the payment may have gone through. Counted
        # as a failed attempt; the claim's sequence is given back below, so the next attempt asks
        # under this same reference and a provider that did take the payment answers it once.
        log.warning("auto top-up %s: the payment provider did not answer", reference, exc_info=True)
        outcome, unanswered = PaymentOutcome(ok=False, reason="the payment provider did not answer"), True

    async def locked(session: AsyncSession) -> AutoTopUp:
        # The workspace row first, then the top-up's: the order of every writer of both
        # (`set_auto_top_up`, a timezone change), and the purchase's rows need the first anyway.
        await session.get_one(Workspace, claim.workspace_id, with_for_update={"read": True, "key_share": True})
        return await session.get_one(AutoTopUp, claim.workspace_id, with_for_update=True)

    async def succeeded(session: AsyncSession) -> bool:
        # Locked before the purchase is looked up: a slow attempt and its take-over may both be
        # answered "paid" for this reference, and only the first to get here records it and
        # counts it in the month, whichever it is.
        topup = await locked(session)
        ws = await session.get_one(Workspace, claim.workspace_id)
        recorded = (await session.execute(select(Purchase.id).where(
            Purchase.workspace_id == claim.workspace_id, Purchase.payment_reference == reference))).first()
        if recorded is None:
            # The system's purchase, not a person's: whoever turned auto top-up on may have left
            # the workspace since. Their standing instruction is what it ran under: the audit
            # entry names them.
            bought = await record_purchase(session, ws_id=claim.workspace_id, pack=pack, reference=reference,
                                           provider=provider.name, actor_id=None, key=reference,
                                           request={"autoTopUp": claim.sequence}, now=now)
            audit.record(session, claim.workspace_id, None, "autotopup.purchased", "purchase", bought.purchase.id,
                         after={"paymentReference": reference, "packId": str(pack.id),
                                "credits": format_credits(pack.units), "priceMinor": pack.price_minor,
                                "currency": pack.currency, "enabledBy": str(topup.enabled_by)}, at=now)
            month = topup_month(now, ws.timezone, topup)
            if topup.month_start != month.start:
                topup.month_start, topup.month_end = month
                topup.purchases_this_month, topup.units_this_month = 0, 0
            topup.purchases_this_month += 1
            topup.units_this_month += pack.units
            alerts.note(session, claim.workspace_id, alerts.TOPUP_DONE, reference, now,
                        credits=format_credits(pack.units))
        if not claim.owns(topup):
            # Taken over after the timeout (this attempt was slow, not dead): the latch belongs to
            # the take-over, whose own outcome re-arms it.
            return True
        topup.consecutive_failures = 0
        topup.unanswered_pack_id = None
        # Re-armed: the next spend that leaves the pool under the threshold buys again. Waiting for
        # a spend to see the pool back over it would miss a spend that takes it from over to under
        # in one step (or a purchase too small to lift it), and the pool would run dry.
        topup.armed, topup.claimed_at, topup.claimed_pack_id = True, None, None
        await alerts.resolve(session, claim.workspace_id, alerts.TOPUP_FAILED, now)
        return True

    async def failed(session: AsyncSession) -> bool:
        topup = await locked(session)
        if not claim.owns(topup):
            # Taken over after the timeout: the take-over asks the provider again under this same
            # reference, and its answer is the one that counts.
            log.warning("auto top-up %s: a late failure (%s) after the claim was taken over; ignored",
                        reference, outcome.reason)
            return False
        topup.consecutive_failures += 1
        # Refreshed while open: the alert tells the failures in a row and the latest reason.
        await alerts.fire(session, claim.workspace_id, alerts.TOPUP_FAILED, PAYMENT_FAILED, now, refresh=True,
                          reason=outcome.reason, failures=topup.consecutive_failures)
        if topup.enabled and topup.consecutive_failures >= topup.failure_limit:
            before = _json(topup)
            topup.enabled = False
            ws = await session.get_one(Workspace, claim.workspace_id)
            ws.auto_topup_enabled = False
            # A change of its settings like any other, made by the system (no actor).
            audit.record(session, claim.workspace_id, None, "autotopup.updated", "auto_topup", claim.workspace_id,
                         before=before, after={**_json(topup), "reason": f"{topup.consecutive_failures} payment "
                                                                         "failures in a row"}, at=now)
            await alerts.fire(session, claim.workspace_id, alerts.TOPUP_DISABLED, "auto-topup", now,
                              failures=topup.consecutive_failures)
        if unanswered and not topup.enabled:
            # Off (turned off meanwhile, or just now after its failures): no spend will ask again
            # under this reference, and the payment may have gone through. The claim stays in
            # flight, so the scheduler takes it over after `CLAIM_TIMEOUT` (`claim_top_up`): asked
            # again at that pace, not at every round, until the provider answers.
            return False
        topup.armed, topup.claimed_at, topup.claimed_pack_id = True, None, None  # a later spend tries again
        if unanswered:
            # Nobody has claimed since (the claim is still ours): the next claim takes this
            # sequence again, and with it the same payment reference, for the same pack.
            topup.sequence -= 1
            topup.unanswered_pack_id = claim.pack_id
        else:  # answered: the next claim asks under a new reference
            topup.unanswered_pack_id = None
        return False

    try:
        return await db.transaction(succeeded if outcome.ok else failed)
    except Exception:
        if outcome.ok:  # money moved and the ledger does not show it yet
            log.error("auto top-up %s: the provider confirmed the payment but its credits were not recorded; the "
                      "claim stays in flight and is taken over under this reference after %s", reference,
                      CLAIM_TIMEOUT)
        raise


# --- settings ----------------------------------------------------------------------------------

async def set_auto_top_up(
    db: Database, caller: Caller, *, workspace_id: str, enabled: bool, threshold: str, pack_id: str,
    monthly_max_purchases: int, monthly_max_credits: str, failure_limit: int = 3,
) -> AutoTopUp:
    """Owners and billing managers turn it on (a standing instruction to charge the workspace)
    and change it while it is on; admins too may turn it off, or change it while it stays off.
    Turning it on clears the failure count; the latch is left to the claim in flight, if any.

    Its failure alerts follow what the settings decide, new purchases: any change saved clears
    "the pack is off sale" (on, it names a pack on sale; off, it buys nothing), and turning it off
    clears a payment's failure too, unless that payment is still to be finished (a claim in
    flight, an unanswered payment to ask again): its outcome settles that alert. A change that
    keeps it on leaves a payment's failure open: another pack or threshold does not make it
    untrue, and the failures in a row go on counting."""
    ws_id = parse_id(workspace_id, "workspace")
    threshold_units = parse_credits(threshold, "threshold", allow_zero=True)
    max_units = parse_credits(monthly_max_credits, "monthlyMaxCredits", allow_zero=True)
    if not 0 <= monthly_max_purchases <= 1000:
        raise ValidationFailed("monthlyMaxPurchases", "must be between 0 and 1000")
    if not 1 <= failure_limit <= 100:
        raise ValidationFailed("failureLimit", "must be between 1 and 100")

    async def work(session: AsyncSession) -> TopUpView:
        # Checked again under the lock (`access.authorized_lock`): a billing manager demoted or
        # removed by the transaction this one waited for gives no instruction to charge the workspace.
        action = Action.MANAGE_AUTO_TOPUP if enabled else Action.DISABLE_AUTO_TOPUP
        ws, _ = await authorized_lock(session, caller, ws_id, action, what="workspace", lock=lambda: (
            session.get_one(Workspace, ws_id, with_for_update=True, populate_existing=True)))
        pack = await session.get(CreditPack, parse_id(pack_id, "credit pack"))
        # A pack off sale is refused for buying (on), not for turning auto top-up off: an owner
        # whose pack was retired must be able to stop it without picking another pack.
        if pack is None or (enabled and not pack.is_active):
            raise NotFound("credit pack")
        topup = await session.get(AutoTopUp, ws_id, with_for_update=True)
        before = _json(topup) if topup else None
        now = caller.clock.now()
        await alerts.resolve(session, ws_id, alerts.TOPUP_FAILED, now, PACK_OFF_SALE)
        if topup is None:
            topup = AutoTopUp(workspace_id=ws_id, enabled=enabled, threshold_units=threshold_units, pack_id=pack.id,
                              monthly_max_purchases=monthly_max_purchases, monthly_max_units=max_units,
                              failure_limit=failure_limit, enabled_by=caller.actor.user_id)
            session.add(topup)
        else:
            topup.threshold_units, topup.pack_id = threshold_units, pack.id
            topup.monthly_max_purchases, topup.monthly_max_units = monthly_max_purchases, max_units
            topup.failure_limit = failure_limit
            if enabled and not topup.enabled:
                # Not re-armed here: a latch is off only while a claim is in flight, and that
                # claim's outcome (or its take-over, under its own reference) settles it.
                topup.consecutive_failures, topup.enabled_by = 0, caller.actor.user_id
                # On again: "auto top-up failed / was turned off" no longer holds, and the next
                # time it is turned off must raise a fresh alert.
                for kind in (alerts.TOPUP_DISABLED, alerts.TOPUP_FAILED):
                    await alerts.resolve(session, ws_id, kind, now)
            elif topup.enabled and not enabled and topup.armed and topup.unanswered_pack_id is None:
                # Off, with no purchase left to finish: nothing it failed to buy will be asked again.
                await alerts.resolve(session, ws_id, alerts.TOPUP_FAILED, now, PAYMENT_FAILED)
            topup.enabled = enabled
        ws.auto_topup_enabled = enabled
        await session.flush()
        if not cap_reached(topup, pack.units, now, ws.timezone):  # caps raised (or a smaller pack): room again
            await alerts.resolve(session, ws_id, alerts.TOPUP_CAP_REACHED, now)
        audit.record(session, ws_id, caller.actor.user_id, "autotopup.updated", "auto_topup", ws_id,
                     before=before, after=_json(topup), at=now)
        return TopUpView(topup, *this_month(topup, now, ws.timezone))

    return await db.transaction(work)


async def stop_for_cancellation(session: AsyncSession, ws: Workspace, actor_id: uuid.UUID, now: datetime) -> bool:
    """A cancelled subscription buys nothing more on its own: auto top-up is turned off with it
    (the workspace row is locked by the caller, then this row, as `set_auto_top_up` locks them).
    A purchase already started is still finished (`claim_top_up`): it may have been paid."""
    topup = await session.get(AutoTopUp, ws.id, with_for_update=True)
    if topup is None or not topup.enabled:
        return False
    before = _json(topup)
    topup.enabled = ws.auto_topup_enabled = False
    audit.record(session, ws.id, actor_id, "autotopup.updated", "auto_topup", ws.id, before=before,
                 after={**_json(topup), "reason": "subscription cancelled"}, at=now)
    return True


def _json(t: AutoTopUp) -> dict:
    return {"enabled": t.enabled, "threshold": t.threshold_units, "pack": t.pack_id,
            "monthlyMaxPurchases": t.monthly_max_purchases, "monthlyMaxUnits": t.monthly_max_units,
            "failureLimit": t.failure_limit}


async def get_auto_top_up(db: Database, caller: Caller, *, workspace_id: str) -> TopUpView | None:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> TopUpView | None:
        await authorize(session, caller, ws_id, Action.VIEW_LEDGER, what="workspace")
        topup = await session.get(AutoTopUp, ws_id)
        if topup is None:
            return None
        ws = await session.get_one(Workspace, ws_id)
        return TopUpView(topup, *this_month(topup, caller.clock.now(), ws.timezone))

    return await db.read(work)


async def set_alert_settings(db: Database, caller: Caller, *, workspace_id: str, low_balance_threshold: str | None,
                             expiry_alert_days: int) -> Workspace:
    ws_id = parse_id(workspace_id, "workspace")
    units = parse_credits(low_balance_threshold, "lowBalanceThreshold", allow_zero=True) \
        if low_balance_threshold is not None else None
    if not 0 <= expiry_alert_days <= 365:
        raise ValidationFailed("expiryAlertDays", "must be between 0 and 365")

    async def work(session: AsyncSession) -> Workspace:
        ws, _ = await authorized_lock(session, caller, ws_id, Action.MANAGE_WORKSPACE, what="workspace", lock=lambda: (
            session.get_one(Workspace, ws_id, with_for_update=True, populate_existing=True)))
        before = {"lowBalance": ws.low_balance_alert_units, "expiryDays": ws.expiry_alert_days}
        ws.low_balance_alert_units, ws.expiry_alert_days = units, expiry_alert_days
        now = caller.clock.now()
        audit.record(session, ws_id, caller.actor.user_id, "alerts.updated", "workspace", ws_id, before=before,
                     after={"lowBalance": units, "expiryDays": expiry_alert_days}, at=now)
        # The alert follows the new threshold at once, as a limit's follow a change of the limit:
        # a threshold set above what is left may see no spend for days.
        if units is None:
            await alerts.resolve(session, ws_id, alerts.LOW_BALANCE, now, "workspace")
        else:
            await _low_balance(session, ws, await available_units(session, ws_id, now), now)
        await session.flush()
        return ws

    return await db.transaction(work)


# --- the scheduler's part -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DueTopUps:
    started: int = 0  # new purchases
    taken_over: int = 0  # purchases already started asked again under their own reference: abandoned
    # claims, and (with auto top-up off, when no spend retries them) unanswered payments
    failed: tuple[tuple[uuid.UUID, Exception], ...] = ()  # workspaces whose purchase failed, with why


async def buy_due_top_ups(db: Database, provider: PaymentProvider, clock: Clock, *, batch: int = 100) -> DueTopUps:
    """Every purchase a pool needs and no spend has started, as a spend under the threshold would
    start it. A pool can drop under its threshold without a spend (its credits expired, or were
    moved to a seat or a group), and a pool too low for the next generation never sees a spend;
    and a claim abandoned by a process that died may see no spend for a long while. Each goes
    through `claim_top_up`, whose conditional UPDATE lets one of any number of schedulers and
    spends claim it, and which checks the pool, the caps and the pack again; a workspace that
    fails is returned in `failed` (the scheduler logs and reports it) and left to the next round.

    Each claim is made at the time it is made, not the round's: a purchase that a spend recorded
    meanwhile is effective from that spend's time, and an older time would not count it in the
    pool, and buy again."""
    started = taken = 0
    failed: list[tuple[uuid.UUID, Exception]] = []
    after = None
    while True:
        page = await db.read(lambda s: _due(s, clock.now(), after, batch))
        for ws_id in page:
            try:
                now = clock.now()
                claim = await db.transaction(lambda s, ws_id=ws_id, now=now: _claim(s, ws_id, now))
                if claim is not None:
                    if claim.taken_over or claim.retry:
                        taken += 1
                    else:
                        started += 1
                    await run_top_up(db, provider, claim, now)
            except Exception as exc:  # noqa: BLE001 - the others go on; the next round retries it
                failed.append((ws_id, exc))  # logged by the caller (`periods.tick`), with the workspace
        if len(page) < batch:
            return DueTopUps(started, taken, tuple(failed))
        after = page[-1]


async def _due(session: AsyncSession, now: datetime, after: uuid.UUID | None, batch: int) -> list[uuid.UUID]:
    # Read without locks and paged by id: the claim decides again, and a workspace it leaves (the
    # caps reached, the pack off sale) must not be read again in this round. After a failed
    # payment the retries are left to spends, as before: a round every interval would use up the
    # failure limit of a workspace nobody uses during a short provider outage, and turn it off.
    # A purchase already started is finished whatever the settings (`claim_top_up`): a claim
    # abandoned in flight, and, with auto top-up off (no spend retries it then), an unanswered
    # payment; one unanswered again while off stays in flight, and is asked after the timeout.
    new_purchase = and_(
        AutoTopUp.enabled, AutoTopUp.armed, AutoTopUp.consecutive_failures == 0,
        _spendable(AutoTopUp.workspace_id, now, pool_only=True).scalar_subquery() < AutoTopUp.threshold_units)
    unanswered_while_off = and_(~AutoTopUp.enabled, AutoTopUp.armed, AutoTopUp.unanswered_pack_id.is_not(None))
    query = select(AutoTopUp.workspace_id).where(
        or_(new_purchase, AutoTopUp.claimed_at <= now - CLAIM_TIMEOUT, unanswered_while_off))
    if after is not None:
        query = query.where(AutoTopUp.workspace_id > after)
    return list((await session.execute(query.order_by(AutoTopUp.workspace_id).limit(batch))).scalars())


async def _claim(session: AsyncSession, ws_id: uuid.UUID, now: datetime) -> TopUpClaim | None:
    return await claim_top_up(session, await session.get_one(Workspace, ws_id), now)


def _expiring_soon(now: datetime):
    """Live grants with credits left that expire within their workspace's alert horizon."""
    ws_t = Workspace.__table__
    return and_(GRANTS.c.live, GRANTS.c.remaining > 0, GRANTS.c.expires_at > now,
                GRANTS.c.expires_at <= now + func.make_interval(0, 0, 0, ws_t.c.expiry_alert_days))


_TIMED_ALERTS = (alerts.GRANT_EXPIRING, alerts.LIMIT_80, alerts.LIMIT_100, alerts.LOW_BALANCE,
                 alerts.TOPUP_CAP_REACHED)


async def alert_workspaces(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    """The workspaces `refresh_alerts` may change something in: a grant expiring soon, a limit at
    80 % or more, or an open alert that time may clear (the scheduler runs them one by one when refreshing all at once
    failed)."""
    ws_t = Workspace.__table__
    expiring = select(GRANTS.c.workspace_id).join(ws_t, ws_t.c.id == GRANTS.c.workspace_id).where(_expiring_soon(now))
    open_ = select(Alert.workspace_id).where(Alert.status == AlertStatus.OPEN, Alert.kind.in_(_TIMED_ALERTS))
    reached = {r["workspace_id"] for r in await limits.at_alert_level(session, now)}
    low = set((await session.execute(_balances_low(now, None))).scalars())
    return sorted(set((await session.execute(expiring.union(open_))).scalars()) | reached | low)


async def refresh_alerts(session: AsyncSession, now: datetime, workspace_id: uuid.UUID | None = None) -> int:
    """Time-driven alert conditions, in every workspace or in `workspace_id`: grants expiring
    soon fire, and so do limits at 80 % or 100 % and balances under their threshold with no alert
    open (`_limits_reached`, `_balances_low`); alerts whose condition has cleared with time (an expired or spent grant, a limit
    period that ended, a balance back above its threshold, an auto top-up month at its cap that ended) resolve."""
    changed = 0
    ws_t = Workspace.__table__
    renewals: dict[uuid.UUID, Renewal] = {}

    async def renewal_of(ws: Workspace) -> Renewal:
        """What the workspace's next close does to its allowance: the close's own rule."""
        if ws.id not in renewals:
            renewals[ws.id] = renewal(ws, await allowance_pieces(session, ws))
        return renewals[ws.id]

    in_scope = [] if workspace_id is None else [GRANTS.c.workspace_id == workspace_id]
    due = (await session.execute(
        select(GRANTS.c.id, GRANTS.c.workspace_id, GRANTS.c.remaining, GRANTS.c.expires_at, GRANTS.c.source,
               GRANTS.c.effective_at, ws_t.c.period_start, ws_t.c.expiry_alert_days)
        .join(ws_t, ws_t.c.id == GRANTS.c.workspace_id)
        .where(_expiring_soon(now), *in_scope)
    )).all()
    for g in due:
        # Only what is really lost: a ROLLOVER plan's close carries part of the allowance over.
        r = NOTHING_ROLLS_OVER
        if is_period_allowance(g, g.period_start):
            r = await renewal_of(await session.get_one(Workspace, g.workspace_id))
        lost = r.lost_by(g.id, g.remaining, g.expires_at, now + timedelta(days=g.expiry_alert_days))
        if lost:
            changed += await alerts.fire(session, g.workspace_id, alerts.GRANT_EXPIRING, str(g.id), now,
                                         grantId=str(g.id), credits=format_credits(lost),
                                         expiresAt=g.expires_at.isoformat())
    open_alerts = (await session.execute(select(Alert).where(
        Alert.status == AlertStatus.OPEN, Alert.kind.in_(_TIMED_ALERTS),
        *([] if workspace_id is None else [Alert.workspace_id == workspace_id])))).scalars().all()
    for a in open_alerts:
        clear = False
        if a.kind == alerts.GRANT_EXPIRING:
            g = await session.get(Grant, uuid.UUID(a.subject))
            clear = g is None or g.remaining == 0 or (g.expires_at is not None and g.expires_at <= now)
            if not clear and g.expires_at is not None and g.source == GrantSource.PLAN_ALLOWANCE:
                ws = await session.get_one(Workspace, g.workspace_id)
                if is_period_allowance(g, ws.period_start):  # nothing of it is lost any more: it all rolls over
                    horizon = max(now + timedelta(days=ws.expiry_alert_days), g.expires_at)
                    clear = (await renewal_of(ws)).lost_by(g.id, g.remaining, g.expires_at, horizon) == 0
        elif a.kind in (alerts.LIMIT_80, alerts.LIMIT_100):
            from domain.governance.models import SpendLimit

            limit_id, _, started = a.subject.partition(":")
            limit = await session.get(SpendLimit, uuid.UUID(limit_id))
            period = datetime.fromisoformat(started)
            clear = limit is None or limit.removed_at is not None
            if not clear:
                ws = await session.get_one(Workspace, a.workspace_id)
                clear = await period_ends(session, limit.id, limit.period, period, ws.timezone) <= now
            if not clear:  # released credits or an approved overage may have brought usage back down
                used, allowance = await _usage_of(session, limit, period, now)
                share = 100 if a.kind == alerts.LIMIT_100 else 80
                clear = not allowance or used * 100 < allowance * share
        elif a.kind == alerts.LOW_BALANCE:
            ws = await session.get_one(Workspace, a.workspace_id)
            clear = ws.low_balance_alert_units is None or \
                await available_units(session, a.workspace_id, now) >= ws.low_balance_alert_units
        elif a.kind == alerts.TOPUP_CAP_REACHED:  # the month it names is over, or there is room again
            topup = await session.get(AutoTopUp, a.workspace_id)
            ws = await session.get_one(Workspace, a.workspace_id)
            clear = topup is None or topup_month(now, ws.timezone, topup).start != datetime.fromisoformat(a.subject) \
                or not cap_reached(topup, (await session.get_one(CreditPack, topup.pack_id)).units, now, ws.timezone)
        if clear:
            changed += await alerts.resolve(session, a.workspace_id, a.kind, now, a.subject)
    for ws_id in (await session.execute(_balances_low(now, workspace_id))).scalars():
        ws = await session.get_one(Workspace, ws_id)
        changed += await _low_balance(session, ws, await available_units(session, ws_id, now), now)
    return changed + await _limits_reached(session, now, workspace_id)


def _balances_low(now: datetime, workspace_id: uuid.UUID | None) -> Select:
    """The workspaces under their low-balance threshold with no alert open. A spend fires the
    alert as it crosses, but a balance also falls with nobody spending: credits expire, a close
    ends an allowance. Only workspaces with a threshold are summed (from their live grants)."""
    ws_t = Workspace.__table__
    alert_open = select(Alert.id).where(Alert.workspace_id == ws_t.c.id, Alert.kind == alerts.LOW_BALANCE,
                                        Alert.status == AlertStatus.OPEN).exists()
    return select(ws_t.c.id).where(
        ws_t.c.low_balance_alert_units.is_not(None), ~alert_open,
        _spendable(ws_t.c.id, now, pool_only=False).scalar_subquery() < ws_t.c.low_balance_alert_units,
        *([] if workspace_id is None else [ws_t.c.id == workspace_id])).order_by(ws_t.c.id)


async def _limits_reached(session: AsyncSession, now: datetime, workspace_id: uuid.UUID | None) -> int:
    """Fire the 80 % and 100 % alerts of the limits at that level whose alert is not open. A spend
    fires them as it reaches the level, but a limit can get there with no spend: an approved
    overage that runs out mid-period lowers the allowance under what was used, and the member is
    refused from then on (a refusal evaluates nothing); and a spend's evaluation that read the
    usage before a concurrent spend's may resolve the alert that spend just fired."""
    reached = await limits.at_alert_level(session, now, workspace_id)
    if not reached:
        return 0
    open_now = set((await session.execute(select(Alert.kind, Alert.subject).where(
        Alert.workspace_id.in_({r["workspace_id"] for r in reached}), Alert.status == AlertStatus.OPEN,
        Alert.kind.in_((alerts.LIMIT_80, alerts.LIMIT_100))))).all())
    changed = 0
    for r in reached:
        subject = _limit_subject(r["id"], r["period_start"])
        due = [alerts.LIMIT_80] + ([alerts.LIMIT_100] if r["used_units"] >= r["allowance"] else [])
        if any((kind, subject) not in open_now for kind in due):
            changed += await _limit_alerts(session, r["workspace_id"], r["id"], r["period_start"], now)
    return changed

