"""DiLoCo and streaming DiLoCo: an outer optimizer on averaged pseudo-gradients.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv 2311.08105): every replica takes ``H`` steps of its own (inner) optimizer from the outer
weights ``phi``; then the pseudo-gradient ``Delta = phi - mean_i theta_i`` (old outer weights minus
new local ones) is all-reduced, set as ``phi.grad`` and stepped by an **outer** ``torch.optim``
optimizer (default SGD, momentum 0.9, Nesterov, with a learning rate that follows the number of
replicas: see :mod:`~lightning_fedopt.strategies.diloco.outer`); every replica restarts from the
new ``phi``.

Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping communication",
arXiv 2501.18512): the tracked tensors are split into ``F`` fragments synchronised in turn,
fragment ``p`` every ``H`` steps at offset ``(p + 1) H / F``; a fragment's all-reduce is launched
at its offset and applied ``tau`` steps later (the transfer overlaps ``tau`` local steps); on
apply the fragment becomes ``phi_new + alpha (theta_local - phi_new)``. Which fragment is in flight
is a function of the step count, so every rank agrees without talking. The fragments are
contiguous runs of tensors, or the repeated blocks dealt round-robin (``fragment_layout="strided"``,
the paper's layout); see :mod:`lightning_fedopt.strategies.diloco.fragments`.

Buffers (e.g. BatchNorm running statistics) are averaged; parameters go through the outer
optimizer. The averaged statistics were estimated with the replicas' weights, not the outer
weights, so whenever the consensus is used (validation, checkpoints, the model ``fit`` returns)
they are re-estimated for the outer weights on each replica's last ``bn_recalibration`` training
batches (default 8; see :mod:`~lightning_fedopt.runtime.batchnorm`). A replica whose weights
are non-finite contributes nothing, is reset to the new outer weights and its inner optimizer
state is cleared.

The consensus changes only at outer steps: a validation Lightning schedules between two outer
steps would score the same model again and is skipped (``skip_unchanged_validation``). The last
training step closes training (the round in flight, the partial round) before that step's
validation and checkpoints, so ``last.ckpt``, the last ``val_loss`` and the returned model agree.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fedopt._validate import check_bool, check_choice, check_float, check_int
from lightning_fedopt.fault_tolerance.rounds import (
    PendingRound,
    finish_torchft_round,
    launch_torchft_round,
    pseudo_deltas,
    torchft_round,
)
from lightning_fedopt.runtime.reduce import NoFiniteReplicaError, masked_sum
from lightning_fedopt.schedules import AutoSync, SyncSchedule, as_schedule
from lightning_fedopt.strategies.diloco.fragments import (
    LAYOUTS,
    AutoFragmentEvents,
    Fragment,
    FragmentEvents,
    InFlight,
    RoundClock,
    assign_fragments,
    fragment_events,
    pseudo_gradients,
    split_fragments,
    strided_fragments,
)
from lightning_fedopt.strategies.diloco.outer import OuterOptimizerFactory, outer_factory, resolve_compressor
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = [
    "DiLoCoStrategy",
    "OuterOptimizerFactory",
    "StreamingDiLoCoStrategy",
    "fragment_events",
    "split_fragments",
    "strided_fragments",
]

log = logging.getLogger("lightning_fedopt")


class DiLoCoStrategy(ReplicaStrategy):
    """DiLoCo: ``H`` inner steps, then an outer optimizer step on the averaged pseudo-gradient.

    With ``fragments > 1`` or ``sync_delay > 0`` this is streaming DiLoCo (also registered as
    ``"streaming_diloco"``).

    Args:
        sync_every: ``H`` (>= 1), ``"auto"``/an :class:`~lightning_fedopt.schedules.AutoSync`, or
            another :class:`~lightning_fedopt.schedules.SyncSchedule` (only without fragments and
            delay). ``"auto"`` with fragments or delay chooses the period of the fragment schedule
            (:class:`~lightning_fedopt.strategies.diloco.fragments.AutoFragmentEvents`, at least
            ``F (tau + 1)``) from the measured step time and fragment transfer time.
        outer_optimizer: a ``torch.optim.Optimizer`` class (``torch.optim.SGD``), its name
            (``"SGD"``, ``"Adam"``), or any callable ``params -> Optimizer``. Default: SGD with
            momentum 0.9, Nesterov (the papers'), and a learning rate that follows the number of
            replicas ``M`` unless ``outer_kwargs`` gives one: 0.4 for ``M = 1``, 0.6 for
            ``M = 2..4``, 0.8 for ``M >= 5`` ("Scaling Laws for DiLoCo", arXiv 2503.09799, Figure
            7; 0.7, the DiLoCo paper's, under ``fault_tolerance="torchft"``), resolved at set-up
            and logged (:class:`~lightning_fedopt.strategies.diloco.outer.ScalingLawOuterOptimizer`).
        outer_kwargs: keyword arguments for ``outer_optimizer`` (e.g. ``{"lr": 0.5}``; an explicit
            ``lr`` always wins).
        fragments: ``F`` (>= 1), number of parameter fragments synchronised in turn.
        fragment_layout: ``"strided"``: the repeated blocks (e.g. ``h.0``, ``h.1``, ...) dealt
            round-robin, block ``j`` to fragment ``j mod F``, as in the streaming DiLoCo paper; the
            embeddings go with fragment 0, the final norm and head with fragment ``F - 1`` (needs
            ``F`` <= the number of blocks); ``"contiguous"``: consecutive tensors in groups of
            roughly equal size (a layer's weight and bias may land in different fragments);
            ``"auto"`` (default): strided when the model has at least ``F`` blocks, else contiguous. Strided is the default where it applies because it
            measured no worse: on the digits benchmark (2 seeds, 320 steps) it ended 2-3% lower at
            F=2 and within 0.4% at F=3.
        sync_delay: ``tau`` (>= 0), steps between launching a fragment's all-reduce and applying
            it; must be smaller than the fragment period ``H // F``.
        mixing: ``alpha`` in [0, 1]: on apply a fragment becomes
            ``phi_new + alpha * (theta_local - phi_new)`` (0: the new outer weights).
        offload_global: keep the outer weights and the outer optimizer on the CPU (pinned when
            CUDA is available), to save accelerator memory.
        compressor: compress the pseudo-gradients: a
            :class:`~lightning_fedopt.compression.Compressor` or its name (``"int8"``, ``"int4"``, ...);
            they then travel through the compressed all-reduce (synchronously).
        warmup_steps, **kwargs: as for :class:`~lightning_fedopt.strategies.replica.ReplicaStrategy`
            (``bn_recalibration`` defaults to 8 here: BatchNorm statistics are re-estimated for the
            outer weights when they are used; cost, per validation, checkpoint and end of fit: 8
            forward passes without gradients on batches already in memory, and one all-reduce of
            the BatchNorm statistics; nothing for a model without BatchNorm).

    Example:
        >>> import lightning as L
        >>> import lightning_fedopt as lf
        >>> strategy = lf.DiLoCoStrategy(sync_every=50, outer_kwargs={"lr": 0.7})
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
        >>> streaming = lf.DiLoCoStrategy(sync_every=40, fragments=4, sync_delay=5, mixing=0.5)
    """

    strategy_name = "diloco"
    supports_round_seconds = True
    supports_fault_tolerance = True
    #: the outer weights are not the replicas' mean: re-estimate their BatchNorm statistics
    default_bn_recalibration = 8

    def __init__(
        self,
        sync_every: int | str | SyncSchedule = 50,
        *,
        outer_optimizer: Any = None,
        outer_kwargs: dict[str, Any] | None = None,
        fragments: int = 1,
        fragment_layout: str = "auto",
        sync_delay: int = 0,
        mixing: float = 0.0,
        offload_global: bool = False,
        compressor: Any = None,
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        every: int | SyncSchedule = (
            as_schedule(sync_every)  # "auto"; any other string is refused there
            if isinstance(sync_every, str)
            else sync_every
        )
        if not isinstance(every, SyncSchedule):
            every = check_int("sync_every", every, low=1)
        fragments = check_int("fragments", fragments, low=1)
        sync_delay = check_int("sync_delay", sync_delay, low=0)
        self.mixing = check_float("mixing", mixing, low=0.0, high=1.0)
        self.fragment_layout = check_choice("fragment_layout", fragment_layout, LAYOUTS)
        streaming = fragments > 1 or sync_delay > 0
        schedule: int | SyncSchedule = every
        if streaming:
            _check_streaming(every, fragments, sync_delay, warmup_steps, kwargs.get("round_seconds"))
            if isinstance(every, AutoSync):
                schedule = AutoFragmentEvents(every, fragments, sync_delay)
            else:
                assert isinstance(every, int)
                schedule = FragmentEvents(every, fragments, sync_delay)
        super().__init__(schedule, warmup_steps=warmup_steps, **kwargs)
        # the default outer learning rate follows this strategy's number of replicas (set-up)
        self.outer_factory = outer_factory(outer_optimizer, outer_kwargs, strategy=self)
        self.sync_every = every if isinstance(every, int) else None
        self.fragments = fragments
        self.sync_delay = sync_delay
        self.offload_global = check_bool("offload_global", offload_global)
        self.compressor = resolve_compressor(compressor)
        self._streaming = streaming
        #: ``phi``: the outer weights, one per tracked tensor (the same on every replica)
        self._outer_weights: list[Tensor] = []
        self._is_param: list[bool] = []
        self._fragments: list[Fragment] = []
        self._inflight: InFlight | None = None
        #: ``fault_tolerance="torchft"``: the round in flight (streaming with ``sync_delay``, CO2)
        #: and its fragment (None: every tensor)
        self._ft_round: tuple[PendingRound, int | None] | None = None
        self._at_global = True
        #: outer steps taken in this process (the consensus changes at those only)
        self._outer_steps = 0
        #: ``sync_every="auto"``, streaming: transfer seconds of the last ``F`` completed fragment rounds
        self._fragment_seconds: collections.deque[float] = collections.deque(maxlen=fragments)
        self.check_fault_tolerance()

    # ---------------------------------------------------------------- state
    def _outer_device(self) -> torch.device:
        return torch.device("cpu") if self.offload_global else self.root_device

    @override
    def setup_algorithm(self) -> None:
        named = self.tracked_named_tensors()
        module = self.lightning_module
        assert module is not None
        param_names = {name for name, _ in module.named_parameters()}
        self._is_param = [name in param_names for name, _ in named]
        dev = self._outer_device()
        pin = self.offload_global and torch.cuda.is_available()
        self._outer_weights = []
        for _, t in named:
            phi = t.detach().to(dev, copy=True)
            self._outer_weights.append(phi.pin_memory() if pin else phi)
        groups = (
            assign_fragments(
                [n for n, _ in named], [t.numel() for _, t in named], self.fragments, self.fragment_layout
            )
            if named
            else []
        )
        self._fragments = [
            Fragment.build(p, g, self._outer_weights, self._is_param, self.outer_factory)
            for p, g in enumerate(groups)
        ]
        self._inflight = None
        self._ft_round = None
        self._at_global = True
        self._fragment_seconds.clear()

    @override
    def algorithm_state_dict(self) -> dict[str, Any]:
        # the transfer in flight was launched by every rank: completing it here is safe, and lets a
        # resume apply exactly what the uninterrupted run would apply
        return {
            "global": [phi.detach().cpu().clone() for phi in self._outer_weights],
            "outer": [f.outer.state_dict() for f in self._fragments],
            "inflight": None if self._inflight is None else self._inflight.state_dict(),
            "at_global": self._at_global,
        }

    @override
    def load_algorithm_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("global", [])) != len(self._outer_weights):
            log.warning(
                "lightning_fedopt: DiLoCo state does not match the model; the outer state starts afresh"
            )
            return
        with torch.no_grad():
            for dst, src in zip(self._outer_weights, state["global"]):
                dst.copy_(src)
        for fragment, sd in zip(self._fragments, state["outer"]):
            fragment.outer.load_state_dict(sd)
        self._at_global = bool(state.get("at_global", True))
        f = state.get("inflight")
        if f is not None:
            self._inflight = InFlight.from_state_dict(f, self._indices(f["fragment"]), self.root_device)

    @override
    def replica_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "inflight_local_finite": None if self._inflight is None else self._inflight.local_finite
        }
        if self.compressor is not None:  # error feedback differs between replicas
            state["compressor"] = self.compressor.state_dict()
        return state

    @override
    def load_replica_state_dict(self, state: dict[str, Any]) -> None:
        if self._inflight is not None and state.get("inflight_local_finite") is not None:
            self._inflight.local_finite = bool(state["inflight_local_finite"])
        if self.compressor is not None and "compressor" in state:
            self.compressor.load_state_dict(state["compressor"])

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed / compressed bytes of the pseudo-gradients so far (None without a compressor)."""
        return self.compressor.totals.ratio if self.compressor is not None else None

    @property
    def inflight_fragment(self) -> int | None:
        """The fragment whose all-reduce is in flight (``None``: none or all)."""
        return None if self._inflight is None else self._inflight.fragment

    # ---------------------------------------------------------------- consensus
    @override
    def consensus_values(self) -> list[Tensor]:
        """The outer weights ``phi`` of the last outer step (no communication)."""
        dev = self.root_device
        return [phi.to(dev, non_blocking=True).clone() for phi in self._outer_weights]

    @override
    def local_is_consensus(self) -> bool:
        return self.steps_since_sync == 0 and self._at_global and self._inflight is None

    @override
    def consensus_version(self) -> int:
        """The consensus (the outer weights) changes at outer steps only."""
        return self._outer_steps if self.evaluate == "consensus" else self.replica_step

    @override
    def after_final_sync(self) -> None:
        """Every replica took the consensus at the end of fit (after a stop the strategy could not
        foresee, or with re-estimated BatchNorm statistics): a round still in flight is completed
        (every rank launched it) and dropped, and the outer weights are what the replicas hold."""
        if self._inflight is not None:
            self._inflight.wait()
            self._inflight = None
        with torch.no_grad():
            for phi, t in zip(self._outer_weights, self.tracked_tensors()):
                phi.copy_(t)
        self._at_global = True

    # ---------------------------------------------------------------- the round
    def _indices(self, fragment: int | None) -> list[int]:
        """The tracked tensors of ``fragment`` (``None``: all of them)."""
        return (
            list(range(len(self._outer_weights))) if fragment is None else self._fragments[fragment].indices
        )

    # ---------------------------------------------------------------- what CO2 builds on
    @property
    def in_flight(self) -> InFlight | None:
        """The round (or fragment) whose all-reduce is in flight, if any."""
        return self._inflight

    @in_flight.setter
    def in_flight(self, value: InFlight | None) -> None:
        self._inflight = value

    @property
    def at_global(self) -> bool:
        """Whether the replica's weights are the global (outer) weights as they stand."""
        return self._at_global

    @at_global.setter
    def at_global(self, value: bool) -> None:
        self._at_global = value

    @property
    def param_mask(self) -> list[bool]:
        """Per tracked tensor: a parameter (its pseudo-gradient travels) or a buffer (its value)."""
        return list(self._is_param)

    @property
    def outer_weights(self) -> list[Tensor]:
        """The global (outer) weights, one per tracked tensor (on ``offload_global``'s device)."""
        return self._outer_weights

    def launch_round(self, fragment: int | None, apply_step: int) -> InFlight:
        """Compute this replica's pseudo-gradients of ``fragment`` (``None``: all) and start their
        all-reduce (asynchronous, except through a compressor); returns the round in flight."""
        tensors = self.tracked_tensors()
        idx = self._indices(fragment)
        local = [tensors[i] for i in idx]
        # heterogeneous local work: a pseudo-gradient is divided by the steps that made it
        k = self.round_effective_steps if self.round_seconds is not None else 1
        contribution = pseudo_gradients(
            local, [self._outer_weights[i] for i in idx], [self._is_param[i] for i in idx], k
        )
        # sync_every="auto": the transfer time, launch to completion
        clock = RoundClock() if isinstance(self.schedule, AutoSync) else None
        pending = masked_sum(
            self.outer_comm,
            local,
            weight=float(k),
            purpose="sync",
            async_op=True,
            contribution=contribution,
            compressor=self.compressor,
            names=[self.tracked.names[i] for i in idx] if self.compressor is not None else None,
        )
        if clock is not None:
            clock.watch(pending)
        return InFlight(fragment, idx, apply_step, pending, local_finite=contribution[2], clock=clock)

    def apply_round(self, f: InFlight | None = None) -> dict[str, float]:
        """Wait for an all-reduce (default: the one in flight) and take the outer step on its
        fragment(s); the replicas' fragment(s) then restart from the new outer weights."""
        if f is None:
            f, self._inflight = self._inflight, None
        assert f is not None
        result = f.wait()
        idx, summed, n_valid, n_bad = f.indices, result.sums, result.valid, result.invalid
        # with round_seconds: the mean step count (FedNova's tau_eff); 1 otherwise
        scale = result.weight / n_valid if n_valid else 1.0
        if n_valid == 0 and n_bad == 0:  # nobody managed a step in the round: nothing to apply
            summed, n_valid, scale = [torch.zeros_like(x) for x in summed], 1, 0.0
        elif n_valid == 0:
            raise NoFiniteReplicaError(self.replica_step)
        tensors = self.tracked_tensors()
        # the whole replica, not only this fragment: a NaN elsewhere poisons the next local steps
        local_finite_now = self.is_finite(tensors)
        info: dict[str, float] = {"excluded_nonfinite": float(n_bad), "valid_replicas": float(n_valid)}
        if self.track_consensus_distance:
            with torch.no_grad():
                mean_local = [
                    (self._outer_weights[i].to(s.device) - s / n_valid) if self._is_param[i] else s / n_valid
                    for i, s in zip(idx, summed)
                ]
            info["consensus_distance"] = self.consensus_distance(
                [tensors[i] for i in idx], mean_local, f.local_finite
            )
        self._outer_step(f.fragment, idx, summed, n_valid, scale)
        alpha = self.mixing if f.fragment is not None else 0.0
        reset = not f.local_finite or not local_finite_now
        with torch.no_grad():
            # a reset replica restarts from the outer weights in every fragment (streaming: the
            # fragments not applied now keep their last outer weights); otherwise only this one moves
            for i in range(len(tensors)) if reset else idx:
                t, phi = tensors[i], self._outer_weights[i].to(tensors[i].device, non_blocking=True)
                if alpha > 0 and not reset:
                    t.copy_(phi + alpha * (t - phi))
                else:
                    t.copy_(phi)
        self._at_global = f.fragment is None and (alpha == 0 or reset)
        if n_bad or reset:
            self.record_nonfinite(n_bad, local=reset)
        if reset:
            self.reset_optimizer_state()
        return info

    def _outer_step(
        self, fragment: int | None, idx: list[int], summed: list[Tensor], n_valid: int, scale: float
    ) -> None:
        """Set the mean pseudo-gradients (times ``scale``) as the outer weights' gradients, average
        the buffers, and step the outer optimizer of ``fragment`` (``None``: of every fragment)."""
        dev = self._outer_device()
        with torch.no_grad():
            for i, s in zip(idx, summed):
                mean = (s / n_valid).to(dev)
                phi = self._outer_weights[i]
                if self._is_param[i]:
                    phi.grad = (mean * scale).to(phi.dtype)
                elif scale > 0:
                    phi.copy_(mean)
        for frag in self._fragments if fragment is None else [self._fragments[fragment]]:
            frag.step()
        self._outer_steps += 1

    @override
    def sync(self) -> dict[str, float]:
        if not self._streaming:
            self._inflight = self.launch_round(None, self.replica_step)
            return self.apply_round()
        launch, apply = self._fragment_event()
        info: dict[str, float] = {}
        if apply is not None:
            info.update(self._apply_fragment())
            info["fragment_applied"] = float(apply)
        if launch is not None:
            self._inflight = self.launch_round(launch, self.replica_step + self.sync_delay)
            if self.sync_delay == 0:
                info.update(self._apply_fragment())
                info["fragment_applied"] = float(launch)
            else:
                info["fragment_launched"] = float(launch)
        return info

    def _apply_fragment(self) -> dict[str, float]:
        """Apply the fragment in flight, noting its transfer time (``sync_every="auto"``)."""
        f = self._inflight
        info = self.apply_round()
        seconds = f.seconds if f is not None else None
        if seconds is not None:
            self._fragment_seconds.append(seconds)
        return info

    # ---------------------------------------------------------------- sync_every="auto"
    @override
    def auto_hides_rounds(self) -> bool:
        """Streaming DiLoCo: its fragments' transfers count as hidden behind ``tau`` steps only on
        CUDA; on CPU gloo's all-reduce runs on the cores that compute (measured on 2 CPU processes,
        100 Mbit/s: counted hidden, H stayed at F (tau + 1) = 8 and the steps took 1.27x the
        compute alone), so the whole round counts as exposed."""
        if self._streaming:
            return self.root_device.type == "cuda"
        return super().auto_hides_rounds()

    @override
    def auto_round_timed(self) -> bool:
        """Streaming DiLoCo times its fragment rounds from launch to completion."""
        return self._streaming or super().auto_round_timed()

    @override
    def auto_round_seconds(self, blocking_seconds: float) -> float | None:
        """Streaming DiLoCo: ``F`` times the mean transfer time of the last (up to ``F``) completed
        fragment rounds, i.e. a round of every fragment (None when none completed in this process,
        e.g. right after a resume); plain DiLoCo: the blocking seconds."""
        if not self._streaming:
            return super().auto_round_seconds(blocking_seconds)
        if not self._fragment_seconds:
            return None
        return self.fragments * sum(self._fragment_seconds) / len(self._fragment_seconds)

    @override
    def auto_step_end(self) -> None:
        """Note whether the round in flight has completed (the completion time, where the backend's
        futures do not tell it: CUDA)."""
        if self._inflight is not None:
            self._inflight.poll()

    # ---------------------------------------------------------------- fault_tolerance="torchft"
    @override
    def fault_tolerance_unsupported(self) -> str | None:
        if self.compressor is not None:
            return (
                "a compressed all-reduce exchanges chunks (all-to-all, all-gather), which torchft does not "
                "fault-manage; it would not fall back to an uncompressed one silently"
            )
        if self.round_seconds is not None:
            return "`round_seconds` weighs each replica by its step count, which the torchft round does not carry"
        return None

    @override
    def sync_fault_tolerant(self, contribute: bool = True) -> dict[str, float]:
        """One torchft round: quorum (a group that is behind heals from a live peer here), a managed
        sum of the finite groups' pseudo-gradients with their count, the commit vote, then the outer
        step only if the round committed. Every group restarts from the global weights: the new ones,
        or, when the round did not commit, the ones before it (its local steps are dropped; never a
        partial average). Streaming DiLoCo: one round per fragment, launched at the fragment's
        offset and finished ``sync_delay`` steps later (:meth:`ft_launch`, :meth:`ft_finish`)."""
        if self._streaming:
            return self._sync_fragments_fault_tolerant(contribute)
        n = len(self._outer_weights)
        numbers, local_nonfinite = torchft_round(
            self.faults,
            self.tracked_tensors(),
            self._outer_weights,
            self._is_param,
            self.replica_step,
            apply=lambda sums, n_valid: self._outer_step(None, list(range(n)), sums, n_valid, 1.0),
            contribute=contribute,
        )
        self._at_global = True
        if local_nonfinite:  # left out of the sum; restarted from the global weights
            self.record_nonfinite(0, local=True)
            self.reset_optimizer_state()
        return numbers

    def _sync_fragments_fault_tolerant(self, contribute: bool) -> dict[str, float]:
        """Streaming DiLoCo's events at this step as torchft rounds. A group joining (or healing)
        learns the step, hence the fragment of the round, from its peer at the quorum."""
        info: dict[str, float] = {}
        if self._ft_round is not None and self._fragment_event()[1] is not None:
            fragment = self._ft_round[1]
            info.update(self.ft_finish())
            info["fragment_applied"] = float(fragment if fragment is not None else -1)
        if not contribute or self._fragment_event()[0] is not None:
            info.update(self.ft_launch(contribute=contribute))
            fragment = self._ft_round[1] if self._ft_round is not None else None
            if self.sync_delay == 0 or fragment is None:
                info.update(self.ft_finish())
                if fragment is not None:
                    info["fragment_applied"] = float(fragment)
            else:
                info["fragment_launched"] = float(fragment)
        return info

    def _fragment_event(self) -> tuple[int | None, int | None]:
        """Streaming DiLoCo's ``(launch, apply)`` after the current step (the schedule's)."""
        if isinstance(self.schedule, (FragmentEvents, AutoFragmentEvents)):
            return self.schedule.events(self.replica_step)
        return fragment_events(self.replica_step, self.sync_every or 1, self.fragments, self.sync_delay)

    def ft_launch(
        self, *, contribute: bool = True, contribution: tuple[list[Tensor], bool] | None = None
    ) -> dict[str, float]:
        """Start a torchft round (``fault_tolerance="torchft"``): the quorum (this group heals
        here when it is behind), then the managed sum of its pseudo-gradients, asynchronously; the
        round stays in flight until :meth:`ft_finish`. Its fragment is the one launched at this
        step, known after the quorum (a healed group takes its peer's step; none at a step without
        a launch: a round with no tensors; every tensor without fragments). ``contribution``: the
        pseudo-gradients and their finiteness computed earlier (CO2 measures them before it applies
        the previous round); default: ``global - local`` now."""
        assert self._ft_round is None, "a torchft round is already in flight"
        fragment: list[int | None] = [None]

        def deltas() -> tuple[list[Tensor], bool]:
            if contribution is not None:
                return contribution
            if self._streaming:
                fragment[0] = self._fragment_event()[0]
                if fragment[0] is None:
                    return [], True
            idx = self._indices(fragment[0])
            tensors = self.tracked_tensors()
            return pseudo_deltas(
                [tensors[i] for i in idx],
                [self._outer_weights[i] for i in idx],
                [self._is_param[i] for i in idx],
            )

        pending = launch_torchft_round(self.faults, deltas, self.replica_step, contribute=contribute)
        self._ft_round = (pending, fragment[0])
        if pending.local_nonfinite:  # left out of the sum; restarted from the global weights now
            self._restart_tensors(range(len(self._outer_weights)))
            self.record_nonfinite(0, local=True)
            self.reset_optimizer_state()
        return {"healed": float(pending.info.healed), "quorum_size": float(pending.info.participants)}

    def ft_finish(self, shift: list[Tensor | None] | None = None) -> dict[str, float]:
        """Finish the torchft round in flight: wait for the sum, vote, and take the outer step of
        its fragment when it committed (``shift``, one per tracked tensor: added to the mean
        pseudo-gradients, as :attr:`InFlight.shift`). The fragment's local tensors then move to the
        new global weights (mixed with ``mixing`` in a streaming round), or, when the round did not
        commit, back to the global weights before it (the round's local steps are dropped)."""
        assert self._ft_round is not None, "no torchft round in flight"
        (pending, fragment), self._ft_round = self._ft_round, None
        n_valid, numbers = finish_torchft_round(self.faults, pending)
        idx = self._indices(fragment) if pending.sums else []
        applied = n_valid > 0 and bool(idx)
        if applied:
            sums = list(pending.sums)
            for j, i in enumerate(idx):
                moved = shift[i] if shift is not None else None
                if moved is not None:  # the mean moves by `moved`: each of the n sums by n * moved
                    sums[j] = sums[j] + n_valid * moved.to(sums[j].device)
            self._outer_step(fragment, idx, sums, n_valid, 1.0)
        alpha = self.mixing if fragment is not None and applied else 0.0
        tensors = self.tracked_tensors()
        with torch.no_grad():
            for i in idx:
                t, phi = tensors[i], self._outer_weights[i].to(tensors[i].device)
                t.copy_(phi + alpha * (t - phi) if alpha > 0 else phi)
        self._at_global = fragment is None and alpha == 0
        return {**numbers, "applied": float(applied)}

    def all_pseudo_gradients(self) -> tuple[list[Tensor], bool]:
        """This replica's contribution to a round of every tensor (new tensors) and whether its
        tensors are finite (:func:`~lightning_fedopt.fault_tolerance.rounds.pseudo_deltas`)."""
        return pseudo_deltas(self.tracked_tensors(), self._outer_weights, self._is_param)

    def _restart_tensors(self, indices: Any) -> None:
        tensors = self.tracked_tensors()
        with torch.no_grad():
            for i in indices:
                tensors[i].copy_(self._outer_weights[i].to(tensors[i].device))

    @property
    def ft_in_flight(self) -> bool:
        """Whether a torchft round is in flight (launched, not finished)."""
        return self._ft_round is not None

    @override
    def final_sync(self) -> None:
        """Apply the fragment in flight, then one outer step of every fragment (the last, partial round)."""
        if self.fault_tolerance:
            if self._streaming:  # the fragment in flight, then one round of every tensor
                if self._ft_round is not None:
                    self.ft_finish()
                if not (self.steps_since_sync == 0 and self._at_global):
                    self.ft_launch(contribution=self.all_pseudo_gradients())
                    self.run.last_sync = {**self.ft_finish(), "step": self.replica_step}
                return
            if not (self.steps_since_sync == 0 and self._at_global):
                self.run.last_sync = {**self.sync_fault_tolerant(), "step": self.replica_step}
            return
        if self._inflight is not None:
            self.apply_round()
        if self.steps_since_sync == 0 and self._at_global:
            return
        self._inflight = self.launch_round(None, self.replica_step)
        self.apply_round()
        self._at_global = True


def _check_streaming(
    sync_every: int | SyncSchedule, fragments: int, sync_delay: int, warmup_steps: int, round_seconds: Any
) -> None:
    """The arguments streaming DiLoCo (``fragments > 1`` or ``sync_delay > 0``) cannot take."""
    if not isinstance(sync_every, AutoSync):  # (AutoFragmentEvents checks the bounds of "auto")
        if not isinstance(sync_every, int):
            raise ValueError(
                "`sync_every` must be an integer H, 'auto' or an AutoSync when `fragments` > 1 or "
                "`sync_delay` > 0"
            )
        if fragments > sync_every:
            raise ValueError(f"`fragments` must be <= `sync_every` ({sync_every}), got {fragments}")
        period = sync_every // fragments
        if sync_delay >= period:
            raise ValueError(
                f"`sync_delay` (tau) must be smaller than the fragment period H // F = {period}, got {sync_delay}"
            )
    if warmup_steps:
        raise ValueError("`warmup_steps` is not supported with `fragments` > 1 or `sync_delay` > 0")
    if round_seconds is not None:
        raise ValueError("`round_seconds` is not supported with `fragments` > 1 or `sync_delay` > 0")


class StreamingDiLoCoStrategy(DiLoCoStrategy):
    """Streaming DiLoCo: :class:`DiLoCoStrategy` with ``fragments=4``, ``sync_delay=1``,
    ``mixing=0.5`` by default (the registered name ``"streaming_diloco"``).

    Example:
        >>> s = StreamingDiLoCoStrategy(sync_every=40)
        >>> (s.fragments, s.sync_delay, s.mixing)
        (4, 1, 0.5)
    """

    strategy_name = "streaming_diloco"

    def __init__(
        self,
        sync_every: int | str | SyncSchedule = 40,
        *,
        fragments: int = 4,
        sync_delay: int = 1,
        mixing: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(sync_every, fragments=fragments, sync_delay=sync_delay, mixing=mixing, **kwargs)
