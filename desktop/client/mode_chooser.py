"""Speculative rounds or the verifier streaming alone: whichever the estimates say is faster, per round.

A round of γ drafts yields E(γ) tokens in γ·t_draft + RTT + t_verify(γ) (the γ controller's estimates,
:mod:`specd.desktop.client.adaptive`); streaming yields one token per decode step t_step. The chooser
compares streaming with the round the controller would send — its fastest γ for the tokens still wanted —
and probes at that same γ. A probe costs its round less what streaming would have made meanwhile.

Estimates can be wrong in either direction, so a decision is never final:

- **The decode step follows the verifier.** While streaming it is the verifier's own ``forward_ms`` per
  token plus the gap the client sees beyond it; while speculating, the *reference* step, calibrated by
  what the last stream measured. The reference is the step the verifier states (``decode_step_ms`` in its
  welcome and every verdict: its own forward cost model, at its present load); from a verifier that does
  not state it, the verify cost of one position from the rounds' fit (calibrated only once the fit rests
  on a few rounds, not on priors). A verifier that becomes faster or slower mid-answer moves the
  comparison within a few rounds or tokens.
- **Streaming measures rounds too.** While the verifier streams, the idle drafter scores each streamed
  token against the probability the verifier sampled it with (stream_scoring.py): acceptance and drafting
  time stay current without a round, so the comparison switches back as soon as rounds would win. It
  spends ``scoring_within_reach`` of the drafter's time while a round accepted in full would beat
  streaming, ``scoring_out_of_reach`` otherwise (where drafter and verifier share a machine, the drafter's
  forwards slow the verifier's). Once ``scored_enough`` streamed tokens were scored since the last probe,
  probes come only at ``probe_share`` of the time: they re-measure what a round's forward and round trip
  cost. From a verifier that does not send those probabilities, the probe schedule below is what undoes a
  wrong switch.
- **Probing never stops for good.** While streaming, a probe (a round, with the next stream asked for in
  the same send) re-measures acceptance. The first probe after a switch comes within
  ``first_probe_tokens`` streamed tokens — after ``first_share`` of the time instead, once several rounds
  say that not even a round accepted in full could win — so a wrong switch is undone within the answer;
  each probe that confirms streaming clearly (rounds below ``close_call`` of its rate) doubles the
  interval, and a close call grows it by half, up to the probe's cost over ``probe_share`` (≈ 2 % of
  the time), which bounds what probing loses where streaming really is faster. A close call backs off
  too: where the two modes are near, a probe every few tokens would cost more than a wrong choice does.
- **The decode step is measured, not assumed.** A stated step is a measurement of the verifier. Without
  one, the step before any stream is extrapolated from the rounds' forwards over γ + 1 positions, and what
  one position costs is a guess there (on a CPU a forward grows with its positions); so the first time
  rounds win by less than ``step_margin`` (a step that much shorter than the guess could change the
  choice), the round is followed by ``step_probe`` streamed tokens, once, and their forward times
  calibrate the extrapolation from then on. Where rounds win by more, that stream would only cost time (it
  breaks drafting ahead, and the drafter must read its tokens).
- **Every switch is traced**: the :class:`~specd.desktop.client.adaptive.Step` carries the two rates that
  decided it, and the answer's stats keep them (``mode_switches``).
"""

from __future__ import annotations

from specd.desktop.client.adaptive import ForgettingMean, GammaController, Step


class ModeChooser:
    """The :class:`~specd.desktop.client.adaptive.ModePolicy` of the product (module docstring)."""

    def __init__(self, controller: GammaController, *, probe_share: float = 0.02, first_share: float = 0.1,
                 min_chunk: int = 8, first_probe_tokens: int = 16, close_call: float = 0.8) -> None:
        self.controller = controller
        self.probe_share = probe_share
        self.first_share = first_share
        self.min_chunk = min_chunk
        self.first_probe_tokens = first_probe_tokens
        self.close_call = close_call  # a probe backs off fully when rounds reach less than this share of streaming
        self.step_probe = 2  # tokens streamed once, after a round, to measure the decode step
        self.step_margin = 2.0  # ... once rounds are less than this many times as fast as the guessed step
        self.scored_enough = 1  # streamed tokens scored since the last probe that make probes rare
        # The share of the drafter's time spent scoring streamed tokens (module docstring).
        self.scoring_within_reach, self.scoring_out_of_reach = 0.3, 0.05
        self._scored_mark = 0  # the controller's count of scored streamed tokens at the last probe
        forgetting = controller.forgetting
        self._stream_forward: ForgettingMean | None = None  # the verifier's forward per streamed token
        self._overhead = ForgettingMean(0.0, forgetting)  # what a streamed token costs beyond its forward
        self._calibration = ForgettingMean(1.0, forgetting)  # streamed forward ÷ the reference step
        self._rounds_mark = -1  # the controller's round count at the last streamed tokens
        self._streamed_ms = 0.0  # streaming time since the last probe
        self._interval_ms: float | None = None  # None: start afresh at the next probe
        self._probing = False

    # -- estimates ------------------------------------------------------------------------------
    def reference_step_ms(self) -> float:
        """The decode step as the verifier last stated it, else the verify cost of one position from the
        rounds' fit: what the calibration by streams scales."""
        return self.controller.server_step_ms or self.controller.single_step_ms()

    def step_ms(self) -> float:
        """Time per token when the verifier streams alone."""
        if self._stream_forward is not None and self.controller.rounds_observed == self._rounds_mark:
            forward = self._stream_forward.value  # nothing newer than the last stream
        else:  # rounds since (or never a stream): they carry the verifier's current speed
            forward = self._calibration.value * self.reference_step_ms()
        return max(1e-3, forward + self._overhead.value)

    def best_round(self, remaining: int) -> tuple[int, float]:
        """The γ the controller would send now and its expected tokens per ms."""
        controller = self.controller
        if controller.fixed is not None:
            gamma = controller.choose(remaining)
            return gamma, controller.rate(gamma)
        upper = max(1, min(controller.gamma_max, remaining - 1))
        return controller.fastest_gamma(upper, controller.estimate())

    def speculative_rate(self, remaining: int, *, optimistic: bool = False) -> float:
        """Tokens per ms of the best round; ``optimistic``: if every draft were accepted."""
        if not optimistic:
            return self.best_round(remaining)[1]
        controller = self.controller
        upper = controller.fixed or max(1, min(controller.gamma_max, remaining - 1))
        return max(controller.rate(gamma, optimistic=True) for gamma in range(1, upper + 1))

    def streaming_rate(self, remaining: int | None = None) -> float:
        """Tokens per ms of streaming: one per decode step while a stream runs; with ``remaining``, of a
        stretch that starts now and so first waits a round trip (over the stretch it would run: up to the
        first probe, or the rest of the answer)."""
        step = self.step_ms()
        if remaining is None:
            return 1.0 / step
        stretch = max(1, min(remaining, 2 * self.first_probe_tokens))
        return stretch / (self.controller.estimate().network_ms + stretch * step)

    def prefers_streaming(self, remaining: int, *, fresh: bool = False) -> bool:
        """Whether streaming beats the best round; ``fresh``: a stream would start now (nothing streams)."""
        streaming = self.streaming_rate(remaining if fresh else None)
        return streaming > self.speculative_rate(remaining)

    def probe_cost_ms(self, remaining: int) -> float:
        """Time a probe loses against streaming: its round (a draft cannot join a running stream, so the
        stream ends first and the probe pays a round trip) less what streaming would make of the tokens
        it yields."""
        controller, step = self.controller, self.step_ms()
        gamma = self.best_round(remaining)[0]
        return max(step, controller.round_ms(gamma) - controller.expected_tokens(gamma) * step)

    def _first_interval(self, remaining: int) -> float:
        """Streaming time before the first probe after a switch: within ``first_probe_tokens`` steps while
        a round could still win (or acceptance rests on a round or two); otherwise only wrong timings could
        make rounds win, and probes start at ``first_share`` of the time."""
        cost = self.probe_cost_ms(remaining)
        hopeless = self.speculative_rate(remaining, optimistic=True) <= self.streaming_rate()
        if hopeless and self.controller.rounds_seen >= 3:
            return cost / self.first_share
        return min(cost / self.first_share, self.first_probe_tokens * self.step_ms())

    def probe_due(self, remaining: int) -> bool:
        if self._never_measured():
            return True
        if self._interval_ms is None:
            self._interval_ms = self._first_interval(remaining)
        interval = self._interval_ms
        if self.controller.streamed_scored - self._scored_mark >= self.scored_enough:
            # The drafter measures acceptance and drafting time on the stream itself, so the estimates
            # switch back as soon as rounds would win; a probe would only re-measure what a round's
            # forward and round trip cost, worth its price over ``probe_share`` of the time.
            interval = max(interval, self.probe_cost_ms(remaining) / self.probe_share)
        return self._streamed_ms >= interval

    def _never_measured(self) -> bool:
        """No round seen, no streamed token scored, and no record of this draft against this verifier."""
        controller = self.controller
        return (controller.rounds_seen <= 0 and controller.streamed_scored == 0
                and controller.priors.source == "built-in")

    def scoring_share(self, remaining: int) -> float:
        """Most while a round accepted in full would beat streaming; a little otherwise, enough to see
        acceptance or drafting time change."""
        if self.speculative_rate(remaining, optimistic=True) > self.streaming_rate():
            return self.scoring_within_reach
        return self.scoring_out_of_reach

    def lead_tokens(self) -> int:
        """Tokens to keep asked for ahead: a round trip's worth of steps, and two to spare."""
        return int(self.controller.estimate().network_ms / self.step_ms()) + 2

    # -- decisions --------------------------------------------------------------------------------
    def next_step(self, remaining: int) -> Step:
        self._judge_probe(remaining)
        gamma, rate = self.best_round(remaining)
        rates = {"speculative_tok_s": 1000.0 * rate, "streaming_tok_s": 1000.0 * self.streaming_rate(remaining),
                 "gamma": gamma}
        if not self.prefers_streaming(remaining, fresh=True):
            if not self.prefers_streaming(remaining):
                # Speculation beats streaming itself, not only a stream's round trip over the few tokens
                # left: start the probe schedule afresh next time streaming wins.
                self._interval_ms, self._scored_mark = None, self.controller.streamed_scored
            if (self._stream_forward is None and not self.controller.server_step_ms
                    and self.controller.rounds_observed and remaining > self.step_probe + 1
                    and rate < self.step_margin * self.streaming_rate()):
                # The decode step was only ever extrapolated from rounds' forwards (γ + 1 positions each,
                # and what one position costs is a guess): stream a few tokens after this round, once.
                self._probing, self._streamed_ms = True, 0.0
                return Step(round=True, stream=self.step_probe, why="probe: streaming rate never measured",
                            **rates)
            return Step(round=True, why="a round is faster", **rates)
        chunk = min(remaining, max(self.min_chunk, 2 * self.lead_tokens()))
        if remaining > 1 and self.probe_due(remaining):
            why = ("probe: acceptance never measured" if self._never_measured()
                   else f"probe after {self._streamed_ms:.0f} ms streamed")
            self._probing, self._streamed_ms = True, 0.0
            self._scored_mark = self.controller.streamed_scored
            return Step(round=True, stream=max(1, chunk - 1), why=why, **rates)
        return Step(round=False, stream=chunk, why="streaming is faster", **rates)

    def top_up(self, remaining: int, owed: int) -> int:
        self._judge_probe(remaining)
        lead = self.lead_tokens()
        if owed > lead or remaining <= owed:
            return 0
        if not self.prefers_streaming(remaining) or self.probe_due(remaining):
            return 0  # let the stream end; the next step is a round
        return min(remaining - owed, max(self.min_chunk, 2 * lead))

    def _judge_probe(self, remaining: int) -> None:
        """After a probe's verdict: back off while streaming still wins, start afresh once it does not."""
        if not self._probing:
            return
        self._probing = False
        if self.prefers_streaming(remaining):
            if self._interval_ms is None:  # the first probe of all: the schedule starts now
                self._interval_ms = self._first_interval(remaining)
            else:
                clear = self.speculative_rate(remaining) < self.close_call * self.streaming_rate()
                cap = self.probe_cost_ms(remaining) / self.probe_share
                self._interval_ms = min(cap, (2.0 if clear else 1.5) * self._interval_ms)
        else:
            self._interval_ms = None

    def observe_stream(self, tokens: int, forward_ms: float, gap_ms: float | None) -> None:
        if tokens <= 0:
            return
        controller = self.controller
        per_token = forward_ms / tokens if forward_ms > 0 else (gap_ms / tokens if gap_ms is not None else None)
        if per_token is not None:
            reference = self.reference_step_ms()
            if self._stream_forward is None:  # the estimate so far is the prior, worth one sample
                self._stream_forward = ForgettingMean(self._calibration.value * reference, controller.forgetting)
            self._stream_forward.update(per_token)
            if controller.server_step_ms or controller.rounds_seen >= 3:  # a fit of a round or two is mostly
                self._calibration.update(per_token / max(1e-3, reference))  # priors: no scale to keep
            if gap_ms is not None:
                self._overhead.update(max(0.0, gap_ms / tokens - per_token))
        self._rounds_mark = controller.rounds_observed
        self._streamed_ms += gap_ms if gap_ms is not None else self.step_ms() * tokens
