"""The context lookup as the draft model's guess: what the drafter's forward feeds beyond the token it
needs, so that drafts that come out equal to the guess need no forward of their own.

A drafter whose backend gives the logits of every token it is fed (``Drafter.propose``'s ``guess``) asks,
whenever it is about to run a forward, what is likely to follow the drafts it has drawn so far. The answer
is the continuation of the longest earlier match of the committed tokens and those drafts in the
conversation, cut where the chance that the drafts still equal it falls below :data:`LOOKAHEAD_WORTH`
(the lookup's own measured acceptance, :class:`SourceAcceptance`). The drafts are drawn from the model's
proposal either way: the guess decides how many forwards drafting takes, never which tokens are drafted.

The guesses are made in the drafter's thread, so :class:`LookupGuesses` keeps its own index of the
committed tokens (the round planner's lives on the event loop), reconciled with each round's committed
prefix as every draft source reconciles its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from specd.desktop.client.context_lookup import ContextLookup
from specd.desktop.client.round_planner import SourceAcceptance

# Feed a looked-up token with a forward while the chance that the drafts get that far is at least this:
# one more token in a forward costs about 0.4 of a forward of its own (the int8 draft on one CPU core:
# 15.5 ms for one token, 41 ms for five), and saves a forward where the guess comes true.
LOOKAHEAD_WORTH = 0.45

Guess = Callable[[Sequence[int]], list[int]]


class LookupGuesses:
    """Guesses of the model's next drafts from the conversation, for the drafter's thread only."""

    def __init__(self, acceptance: SourceAcceptance) -> None:
        self.acceptance = acceptance  # the planner's, read only
        self.lookup = ContextLookup()

    def for_round(self, committed: Sequence[int], extra: Sequence[int], gamma: int) -> Guess:
        """The guess for a round of ``gamma`` model drafts after ``committed + extra`` (``extra``: what the
        round assumes or sends before the model's drafts: drafts in flight, a guessed target token,
        looked-up drafts). Called with the drafts drawn so far; returns at most the tokens whose logits a
        later draft of the round would read."""
        committed, extra = list(committed), list(extra)

        def guess(drafts: Sequence[int]) -> list[int]:
            room = gamma - len(drafts) - 1  # the last draft's logits are not needed
            if room <= 0:
                return []
            self.lookup.sync(committed)
            found, matched = self.lookup.find([*extra, *drafts], room)
            return self._worth_feeding(found, matched)

        return guess

    def _worth_feeding(self, found: list[int], matched: int) -> list[int]:
        """``found`` up to where the chance that the drafts equal it all that far drops below
        :data:`LOOKAHEAD_WORTH`."""
        reach, following = self.acceptance.first(matched), self.acceptance.next(matched)
        kept = 0
        while kept < len(found) and reach >= LOOKAHEAD_WORTH:
            kept, reach = kept + 1, reach * following
        return found[:kept]
