"""The two state machines of a campaign: the campaign's own, and each vehicle's part in it.

Pure functions, no database: :func:`campaign_transition` and
:func:`part_transition` are the one place that says which change is legal;
everything that changes a state (operators' routes, the engine reacting to
vehicles' reports, the background sweep) goes through them. An illegal
change raises :class:`CampaignTransitionError` (HTTP 409) saying the state,
the action and what is allowed instead.

A campaign::

    draft --approve--> approved --start--> running --(last phase met)--> completed
      |                   |                 |  ^
      |                   |           pause |  | resume
      |                   |                 v  |
      +---- pause / cancel from every non-final state ---> paused / cancelled
                                            running --(failure threshold)--> aborted | paused

============  ==========================================================================
action        from → to
============  ==========================================================================
approve       draft → approved (the approver is recorded and must not be the creator)
start         approved → running
pause         draft, approved, running → paused (``paused_from`` remembers which)
resume        paused → the state it was paused from
cancel        draft, approved, running, paused → cancelled
complete      running → completed (engine: the last phase met its success threshold)
abort         running → aborted (engine: a phase's failure rate crossed its threshold)
============  ==========================================================================

``completed``, ``aborted`` and ``cancelled`` are final: every action on them is refused.

A vehicle's part (one row per vehicle the campaign reached, created on first contact)::

    pending --offer--> offered --postpone--> awaiting_consent
       |                 |  |                     |
       |                 |  +--succeed / fail-----+--> succeeded | failed
       +--skip--> skipped_incompatible
       +--cancel (also from offered, awaiting_consent)--> cancelled

================  ============================================================================
event             from → to
================  ============================================================================
offer             pending → offered (assignments made: the director lists the images)
postpone          offered → awaiting_consent (the agent downloaded, a precondition such as
                  consent is not met yet: its manifest says ``postponed`` for the image)
succeed           offered, awaiting_consent → succeeded (every ECU runs its image)
fail              offered, awaiting_consent → failed (an ECU refused, failed or rolled back)
skip              pending → skipped_incompatible (hardware, dependencies or rollback)
cancel            pending, offered, awaiting_consent → cancelled (assignments withdrawn)
================  ============================================================================

"Downloading" and "installing" are not separate states: a vehicle's
manifest says what it runs and how its last install ended, not how far a
download got, so the server shows only what it can know.
"""

from __future__ import annotations

import enum

from signing.exceptions import UptakeError


class CampaignState(enum.StrEnum):
    DRAFT = "draft"
    APPROVED = "approved"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


class CampaignAction(enum.StrEnum):
    APPROVE = "approve"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    COMPLETE = "complete"
    ABORT = "abort"


class PartState(enum.StrEnum):
    PENDING = "pending"
    OFFERED = "offered"
    AWAITING_CONSENT = "awaiting_consent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED_INCOMPATIBLE = "skipped_incompatible"
    CANCELLED = "cancelled"


class PartEvent(enum.StrEnum):
    OFFER = "offer"
    POSTPONE = "postpone"
    SUCCEED = "succeed"
    FAIL = "fail"
    SKIP = "skip"
    CANCEL = "cancel"


FINAL_CAMPAIGN_STATES = frozenset(
    {CampaignState.COMPLETED, CampaignState.ABORTED, CampaignState.CANCELLED}
)
FINAL_PART_STATES = frozenset(
    {
        PartState.SUCCEEDED,
        PartState.FAILED,
        PartState.SKIPPED_INCOMPATIBLE,
        PartState.CANCELLED,
    }
)

_S, _A = CampaignState, CampaignAction
_CAMPAIGN: dict[CampaignAction, dict[CampaignState, CampaignState]] = {
    _A.APPROVE: {_S.DRAFT: _S.APPROVED},
    _A.START: {_S.APPROVED: _S.RUNNING},
    _A.PAUSE: {_S.DRAFT: _S.PAUSED, _S.APPROVED: _S.PAUSED, _S.RUNNING: _S.PAUSED},
    _A.RESUME: {},  # paused → paused_from, see campaign_transition
    _A.CANCEL: {
        _S.DRAFT: _S.CANCELLED,
        _S.APPROVED: _S.CANCELLED,
        _S.RUNNING: _S.CANCELLED,
        _S.PAUSED: _S.CANCELLED,
    },
    _A.COMPLETE: {_S.RUNNING: _S.COMPLETED},
    _A.ABORT: {_S.RUNNING: _S.ABORTED},
}
_P, _E = PartState, PartEvent
_PART: dict[PartEvent, dict[PartState, PartState]] = {
    _E.OFFER: {_P.PENDING: _P.OFFERED},
    _E.POSTPONE: {_P.OFFERED: _P.AWAITING_CONSENT},
    _E.SUCCEED: {_P.OFFERED: _P.SUCCEEDED, _P.AWAITING_CONSENT: _P.SUCCEEDED},
    _E.FAIL: {_P.OFFERED: _P.FAILED, _P.AWAITING_CONSENT: _P.FAILED},
    _E.SKIP: {_P.PENDING: _P.SKIPPED_INCOMPATIBLE},
    _E.CANCEL: {
        _P.PENDING: _P.CANCELLED,
        _P.OFFERED: _P.CANCELLED,
        _P.AWAITING_CONSENT: _P.CANCELLED,
    },
}


class CampaignTransitionError(UptakeError):
    """An action that the campaign's (or a vehicle part's) current state does not allow (409)."""

    status = 409


def allowed_actions(state: CampaignState) -> list[CampaignAction]:
    """The actions :func:`campaign_transition` accepts in ``state``."""
    allowed = [action for action, moves in _CAMPAIGN.items() if state in moves]
    if state == CampaignState.PAUSED:
        allowed.insert(0, CampaignAction.RESUME)
    return allowed


def campaign_transition(
    state: CampaignState, action: CampaignAction, paused_from: CampaignState | None = None
) -> CampaignState:
    """The state ``action`` leads to from ``state``; raise :class:`CampaignTransitionError` if illegal.

    ``paused_from`` is where a paused campaign came from (``resume`` returns there).
    """
    if action == CampaignAction.RESUME and state == CampaignState.PAUSED:
        if paused_from not in (CampaignState.DRAFT, CampaignState.APPROVED, CampaignState.RUNNING):
            raise CampaignTransitionError(
                f"cannot resume: the campaign does not say what it was paused from ({paused_from})"
            )
        return paused_from
    target = _CAMPAIGN[action].get(state)
    if target is None:
        if state in FINAL_CAMPAIGN_STATES:
            raise CampaignTransitionError(
                f"cannot {action} a campaign that is {state}: {state} is final"
            )
        allowed = ", ".join(allowed_actions(state)) or "none"
        raise CampaignTransitionError(
            f"cannot {action} a campaign that is {state} (allowed in {state}: {allowed})"
        )
    return target


def part_transition(state: PartState, event: PartEvent) -> PartState:
    """The state ``event`` leads a vehicle's part to; raise :class:`CampaignTransitionError` if illegal."""
    target = _PART[event].get(state)
    if target is None:
        raise CampaignTransitionError(f"a vehicle's part that is {state} cannot {event}")
    return target
