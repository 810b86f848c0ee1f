"""Adaptive mode of the local runtime (`aiflow up --adaptive`): re-plan as the emulated links change,
re-partition the running flow live, make-before-break.

The planner sees the local runtime as a cluster: one Ready node per tier with the tier's compute
factor, and per link direction the emulated bandwidth and round trip (`planning.cluster_of`). It
plans the captioning flow (`vision_head -> caption_drafter -> caption_verifier`, every stage on an
`auto` tier, as examples/auto-placement.yaml) with the same functions the operator's rescheduler uses:
`solver.plan` for the best plan, `solver.assess` for the running one under the new conditions,
`hysteresis.decide` for whether to move.

A plan runs as one revision: a copy of each stage's model under its own name (`vision_head.r2`,
loaded from model_repo/ with a config override, beside the copies of the revision that serves).
A move goes through the phases the operator's moves go through (`planner.migration`): Starting
(the new revision's copies load; the old ones serve), Switching (the entry the clients read from the
state file names the new revision, and is read back), Draining (the drain grace: a client that read
the old entry still reaches it), Done (the old copies are unloaded, entry first, each once its last
request has left it). So a request in flight finishes on the revision it entered, and a new one
enters the new revision.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from aiflow.api.spec import Flow, Stage, Triton
from aiflow.local.links import LinkConfig
from aiflow.local.planning import SCHEME_NAME, UNSHAPED_MBPS, cluster_of, copy_name, scheme_of, source_model
from aiflow.local.schemes import Placement, RunningFlow, Scheme, Wire, wiring
from aiflow.planner.hysteresis import Decision, Policy, decide
from aiflow.planner.migration import RETIRE, STARTING, Move, Seen, advance, drain_grace_s
from aiflow.planner.problem import PlanError, Problem
from aiflow.planner.profile import Profile
from aiflow.planner.solver import Plan, assess, plan

STATE_KEY = "adaptive"
DEFAULT_INTERVAL_S = 10.0  # re-plan at least this often; a link change re-plans at the next poll
POLL_S = 0.2
DEFAULT_GRACE_S = 2.0  # the least drain after the switch: time for a client that read the old entry to reach it
DEFAULT_DRAIN_TIMEOUT_S = 300.0


def captioning_flow() -> Flow:
    """The flow the local runtime adapts: examples/auto-placement.yaml (every tier `auto`)."""
    stages = (Stage("head", "vision_head"), Stage("drafter", "caption_drafter"), Stage("verifier", "caption_verifier"))
    return Flow(name="captioning", namespace="local", stages=stages, triton=Triton(image="local"))


# ---- the pure part: the chain a plan runs as (aiflow.local.planning), its record in the state file ----


def scheme_dict(scheme: Scheme) -> dict:
    return {"name": scheme.name, "summary": scheme.summary, "upload": scheme.upload,
            "chain": [{"tier": p.tier, "model": p.model, "knobs": dict(p.knobs)} for p in scheme.chain]}


def scheme_from_dict(doc: Mapping) -> Scheme:
    chain = tuple(Placement(p["tier"], p["model"], dict(p.get("knobs") or {})) for p in doc["chain"])
    return Scheme(doc["name"], doc.get("summary", ""), chain, doc.get("upload", "png"))


def serving_scheme(state: Mapping) -> Scheme:
    """The chain the adaptive runtime recorded in `state` serves now; ValueError when it is not adaptive."""
    doc = state.get(STATE_KEY)
    if not doc or not doc.get("scheme"):
        raise ValueError("the running flow is not adaptive (start it with `aiflow up --adaptive`), "
                         "or has no plan yet; choose a --scheme")
    return scheme_from_dict(doc["scheme"])


# ---- the I/O part: loading and unloading revisions ----------------------------------------------


def model_files(model_dir: Path) -> dict[str, bytes]:
    """A model directory's files except config.pbtxt, as Triton's load API takes them (`file:1/model.py`)."""
    return {
        f"file:{p.relative_to(model_dir).as_posix()}": p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != "config.pbtxt" and "__pycache__" not in p.parts
    }


def load_copy(flow: RunningFlow, wire: Wire, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
    """Load `wire.model`, a copy of a model_repo/ model under its own name, wired as `wire` says."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from aiflow.local.tritonserver import ModelLoadError, model_config_json

    source = Path(flow.state["model_repo"]) / source_model(wire.model)
    config = model_config_json(source, flow.wanted_parameters(wire), name=wire.model)
    client = grpcclient.InferenceServerClient(flow.state["tiers"][wire.tier]["grpc"])
    try:
        client.load_model(wire.model, config=config, files=model_files(source), client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise ModelLoadError(f"{wire.tier}: model {wire.model!r} failed to load: {exc.message()}") from exc
    finally:
        client.close()


def instance_running(server, model: str) -> bool:
    """Whether a Python-backend instance of `model` still runs under `server` (its stub process, named
    `<model>_<group>_<instance>`, exits once the model's last request has returned)."""
    from aiflow.local.tritonserver import process_group_members

    if server.pid is None:
        return False
    pattern = re.compile(rf"{re.escape(model)}_\d+_\d+")
    for pid in process_group_members(server.pid):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(pattern.fullmatch(a.decode(errors="replace")) for a in args):
                return True
    return False


def unload_drained(runtime, tier: str, model: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
    """Unload `model` on `tier`; wait until its requests in flight have finished. False on timeout."""
    server = runtime.server(tier)
    server.unload_model(model, wait=False)
    deadline = time.monotonic() + timeout_s
    while instance_running(server, model):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---- the controller ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Revision:
    number: int
    plan: Plan
    scheme: Scheme


@dataclass(frozen=True)
class DecisionLog:
    time: float
    decision: str  # initial | moved | kept | failed
    reason: str
    revision: int

    def line(self) -> str:
        return f"[adaptive] {self.decision} (revision {self.revision}): {self.reason}"


class AdaptiveController:
    """Keeps a LocalRuntime on the best plan for its links: plan, decide, move make-before-break.

    `start()` places the flow (revision 1) and starts a thread that re-plans when a link's settings
    change, and at least every `interval_s`; `tick()` is one such look. Decisions go to `say` and to
    the state file (key `adaptive`: the serving scheme, its plan, the last decisions).
    """

    def __init__(
        self,
        runtime,
        profile: Profile,
        policy: Policy = Policy(),
        flow: Flow | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        grace_s: float | None = None,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
    ):
        if interval_s <= 0 or (grace_s is not None and grace_s < 0):
            raise ValueError(f"bad adaptive timing: interval {interval_s:g}s must be > 0, grace {grace_s}s >= 0")
        self.runtime = runtime
        self.flow = flow or captioning_flow()
        self.profile, self.policy = profile, policy
        self.interval_s, self.grace_s = interval_s, grace_s
        self.say, self.clock = say, clock
        self.serving: Revision | None = None
        self.move: Move | None = None  # the move under way (planner.migration)
        self.last_migration_at: float | None = None
        self.decisions: list[DecisionLog] = []
        self._seen_links: dict[str, LinkConfig] = {}
        self._last_look = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- looking ---------------------------------------------------------------------------------

    def links(self) -> dict[str, LinkConfig]:
        return {link.name: link.config for link in self.runtime.links.values()}

    def problem(self) -> Problem:
        cluster = cluster_of(self.links(), self.runtime.compute_factors)
        return Problem(self.flow, cluster, self.profile)

    def tick(self) -> DecisionLog | None:
        """Re-plan under the links as they are now; move when `hysteresis.decide` says so."""
        with self._lock:
            self._seen_links, self._last_look = self.links(), time.monotonic()
            problem, now = self.problem(), self.clock()
            try:
                best = plan(problem)
            except PlanError as exc:
                return self._record("kept", f"no plan: {exc}")
            current = assess(problem, self.serving.plan.candidate) if self.serving else None
            decision = decide(current, best, self.policy, now, self.last_migration_at)
            if not decision.migrate:
                return self._record("kept", decision.reason)
            return self._move(best, decision, initial=current is None)

    def _links_changed(self) -> bool:
        return self.links() != self._seen_links

    def _record(self, decision: str, reason: str) -> DecisionLog:
        entry = DecisionLog(self.clock(), decision, reason, self.serving.number if self.serving else 0)
        repeated = self.decisions and (self.decisions[-1].decision, self.decisions[-1].reason) == (decision, reason)
        if not repeated:  # a steady state is said once, not every interval
            self.decisions.append(entry)
            self.say(entry.line())
            self._publish()
        return entry

    # -- moving ----------------------------------------------------------------------------------

    def _move(self, best: Plan, decision: Decision, initial: bool) -> DecisionLog:
        number = self.serving.number + 1 if self.serving else 1
        target = Revision(number, best, scheme_of(best, self.flow, number))
        flow = RunningFlow.of(self.runtime)
        wires = wiring(target.scheme)
        self.say(f"[adaptive] loading revision {number}: {target.scheme.describe()}")
        with ThreadPoolExecutor(max_workers=len(wires)) as pool:  # each load imports torch in a fresh stub
            outcomes = list(pool.map(lambda w: _attempt(load_copy, flow, w), wires))
        if errors := [str(e) for e in outcomes if e is not None]:
            for w, e in zip(wires, outcomes):  # nothing half-made: the old revision keeps serving
                if e is None:
                    with contextlib.suppress(Exception):
                        unload_drained(self.runtime, w.tier, w.model)
            return self._record("failed", f"revision {number} did not load, revision "
                                f"{self.serving.number if self.serving else '-'} keeps serving: {'; '.join(errors)}")
        old = self.serving
        if old is None:
            self.serving = target
            return self._record("initial", decision.reason)
        move, action = advance(Move(old.number, number, STARTING, self.clock()), Seen(self.clock(), target_ready=True),
                               self.drain_s(old))
        self.move, self.serving, self.last_migration_at = move, target, self.clock()
        entry = self._record("moved", decision.reason)  # publishes the new entry: the switch
        self._finish(old, target)
        return entry

    def drain_s(self, old: Revision) -> float:
        """The drain grace of a move away from `old`: as given, else from the flow's latency objective
        (or the old plan's predicted latency), at least DEFAULT_GRACE_S."""
        if self.grace_s is not None:
            return self.grace_s
        return drain_grace_s(self.flow.objective.latency_ms, old.plan.latency_ms, floor_s=DEFAULT_GRACE_S)

    def _switched(self, target: Revision) -> bool:
        """Whether the state file the clients read names the target's entry (read back)."""
        from aiflow.local.runtime import RuntimeNotRunning, read_state

        with contextlib.suppress(OSError, ValueError, KeyError, RuntimeNotRunning):
            return serving_scheme(read_state(self.runtime.state_dir)).entry.model == target.scheme.entry.model
        return False

    def _finish(self, old: Revision, target: Revision) -> None:
        """Switching -> Draining -> Done, as `planner.migration.advance` says, then retire `old`."""
        grace, action = self.drain_s(old), None
        deadline = time.monotonic() + grace + DEFAULT_DRAIN_TIMEOUT_S
        while action != RETIRE:
            switched = self._switched(target)  # the clients read the entry per request: switched is taken
            self.move, action = advance(self.move, Seen(self.clock(), True, switched, switched), grace)
            if action == RETIRE:
                break
            if time.monotonic() > deadline:
                self.say(f"[adaptive] revision {target.number}: the switch was not seen in the state file; "
                         f"retiring revision {old.number} anyway")
                break
            time.sleep(min(POLL_S, self.move.left_s(grace, self.clock()) or POLL_S))
        self.move = None
        self._retire(old)

    def _retire(self, old: Revision) -> None:
        """Unload the old revision's copies entry first, each after its last request has left it: a
        request in flight then never finds its next stage gone."""
        for p in old.scheme.chain:
            if not unload_drained(self.runtime, p.tier, p.model):
                self.say(f"[adaptive] {p.tier}: {p.model} still busy after {DEFAULT_DRAIN_TIMEOUT_S:g}s; "
                         "unloading the rest of its revision anyway")
        self.say(f"[adaptive] revision {old.number} removed")

    def _publish(self) -> None:
        s = self.serving
        self.runtime.publish(STATE_KEY, {
            "revision": s.number if s else 0,
            "scheme": scheme_dict(s.scheme) if s else None,
            "plan": s.plan.to_dict() if s else None,
            "move": self.move.to_record() if self.move else None,
            "policy": {"min_improvement": self.policy.min_improvement, "cooldown_s": self.policy.cooldown_s,
                       "interval_s": self.interval_s},
            "decisions": [asdict(d) for d in self.decisions[-20:]],
        })

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> AdaptiveController:
        """Place the flow (raises if its first revision cannot load), then watch in a thread."""
        entry = self.tick()
        if self.serving is None:
            raise RuntimeError(f"the adaptive flow could not be placed: {entry.reason if entry else '?'}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="aiflow-adaptive", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if self._links_changed() or time.monotonic() - self._last_look >= self.interval_s:
                try:
                    self.tick()
                except Exception as exc:  # a failed look must not end adaptation; say why and go on
                    self.say(f"[adaptive] re-planning failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _attempt(fn, *args) -> Exception | None:
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


# ---- the client side ----------------------------------------------------------------------------

def caption_serving(state_path, images: Sequence[tuple[str, bytes]], timeout_s: float = 120.0, retries: int = 2):
    """Caption each image through the scheme the adaptive runtime serves, reading the state file per
    image. A request that reached the entry of a revision just removed did no work: it is sent again
    to the serving one."""
    from aiflow.local.client import CaptionError, caption_images
    from aiflow.local.runtime import read_state

    results = []
    for image in images:
        for attempt in range(retries + 1):
            state = read_state(state_path)
            scheme = serving_scheme(state)
            try:
                results += caption_images(RunningFlow(state), scheme, [image], timeout_s)
                break
            except CaptionError as exc:
                entry_gone = f"unknown model: '{scheme.entry.model}'" in str(exc)
                if not entry_gone or attempt == retries:
                    raise
    return results


__all__ = [  # the planning names are re-exported: the adaptive runtime's callers find them here too
    "SCHEME_NAME", "UNSHAPED_MBPS", "AdaptiveController", "DecisionLog", "Revision", "captioning_flow",
    "caption_serving", "cluster_of", "copy_name", "scheme_of", "serving_scheme", "source_model",
]
