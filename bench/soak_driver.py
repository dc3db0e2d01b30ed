"""The soak's driver (bench/soak.py): one step at a time, at random (seeded), it changes what the service should
serve, and waits until the served model holds exactly the skills and versions that its own bookkeeping implies.

Steps: new skills; new versions; bursts of drops; corrupt drops (:mod:`soak_inbox`); ``config.toml`` edits
(disable/enable, and invalid edits that must be rejected while the daemon keeps serving); enable/disable, pin/unpin
and remove over HTTP; remove through the CLI; re-adding a removed skill's very bytes; and every
:data:`WEIGHTS_EVERY` seconds a check of the served weights against the reference stitch (:mod:`soak_checks`).
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from soak_checks import check_weights
from soak_inbox import Inbox
from soak_service import TOKEN, Service, http_client
from soak_traffic import Traffic
from soak_world import INVALID_EDITS, REASONS, config_text, log, sha256_path, write_atomic

from skillhub.client import ApiError, Client

SETTLE_TIMEOUT = 90.0  # seconds a step may take to show in the served model (a truncated drop waits >= 5 s)
WEIGHTS_EVERY = 20.0  # seconds between checks of the served weights during the run
MIN_SKILLS, MAX_SKILLS = 3, 9


@dataclass
class Skill:
    """What the driver has done to one skill, hence what the service should serve of it."""

    name: str
    source: str | None = None  # sha256 of the newest good drop (None: removed)
    blob: Path | None = None  # that drop's bytes, kept for re-adding after a remove
    api_enabled: bool = True
    cfg_disabled: bool = False
    pinned_mask: str | None = None  # while pinned to an older version: that version's mask sha

    @property
    def served(self) -> bool:
        return self.source is not None and self.api_enabled and not self.cfg_disabled


@dataclass
class Driver:
    """Drives the service one step at a time and records how long each kind of step took to be served."""

    root: Path
    service: Service
    traffic: Traffic
    base: dict[str, torch.Tensor]
    port: int
    seed: int
    skills: dict[str, Skill] = field(default_factory=dict)
    actions: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    weights_checks: list[dict[str, Any]] = field(default_factory=list)
    invalid_edits: Counter[str] = field(default_factory=Counter)
    cli_runs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.inbox = Inbox(self.root, self.base, self.seed, self.rng)
        self.api = Client(self.service.url, token=TOKEN, timeout=60)
        self.http = http_client(self.service.url)
        self.base_sha = sha256_path(self.root / "base.safetensors")
        self.timeline: list[tuple[float, str]] = []  # (seconds since the clients started, step)
        self.start_time = time.monotonic()
        kinds = [("new_version", None), ("burst", None), ("config_toggle", None), ("config_invalid", None),
                 ("api_toggle", None), ("remove_http", None), ("remove_cli", None), ("readd", None), ("pin", None),
                 *(("corrupt", k) for k in sorted(REASONS))]
        self.rng.shuffle(kinds)
        self.agenda: list[tuple[str, str | None]] = [("new_skill", None)] * (MIN_SKILLS + 2) + kinds

    # --- expectations ---

    def expected(self) -> dict[str, tuple[str, str]]:
        return {s.name: ("mask", s.pinned_mask) if s.pinned_mask else ("source", s.source or "")
                for s in self.skills.values() if s.served}

    def served_names(self) -> set[str]:
        return set(self.expected())

    def diff(self, served: dict[str, Any]) -> str | None:
        want = self.expected()
        if set(served) != set(want):
            return f"served {sorted(served)}, expected {sorted(want)}"
        for name, (field_, value) in want.items():
            if served[name].get(field_) != value:
                return f"{name}: served {field_} {str(served[name].get(field_))[:12]}, expected {value[:12]}"
        return None

    def settle(self, kind: str, t0: float, *, record: bool = True) -> bool:
        """Wait until the served model is what the expectations say; record how long the step took."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        why = "?"
        while time.monotonic() < deadline:
            self.service.check_alive(f"waiting for {kind}")
            try:
                why = self.diff(self.api.model().get("skills") or {}) or ""
            except ApiError as e:
                why = str(e)
            if not why:
                if record:
                    self.actions[kind].append(time.monotonic() - t0)
                self.traffic.allow(self.served_names())
                return True
            time.sleep(0.05)
        self.failures.append(f"{kind}: not applied within {SETTLE_TIMEOUT:.0f} s: {why}")
        return False

    def note(self, kind: str) -> None:
        self.timeline.append((round(time.monotonic() - self.traffic.t0, 2), kind))

    def change(self, kind: str, mutate: Callable[[], object], act: Callable[[], object]) -> bool:
        """One step: update the expectations, revoke skills about to leave before acting, act, wait."""
        before = self.served_names()
        mutate()
        self.traffic.revoke(before - self.served_names())
        t0 = time.monotonic()
        act()
        return self.settle(kind, t0)

    def wait_for(self, done: Callable[[], bool], timeout: float, every: float, *, alive: str = "") -> bool:
        """Poll ``done`` until it holds or ``timeout`` passes (checking the daemon is up, while ``alive``)."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            if alive:
                self.service.check_alive(alive)
            time.sleep(every)
        return done()

    # --- actions ---

    def new_name(self) -> str:
        return f"skill{self.inbox.next_number():04d}"

    def present(self) -> list[Skill]:
        return [s for s in self.skills.values() if s.source is not None]

    def removable(self) -> list[Skill]:
        return [s for s in self.present() if not self.inbox.busy(s.name)]

    def gone(self) -> list[Skill]:
        return [s for s in self.skills.values()
                if s.source is None and s.blob is not None and not self.inbox.busy(s.name)]

    def act_new_skill(self) -> bool:
        name = self.new_name()
        return self._drop_and_settle("new skill", [self.skills.setdefault(name, Skill(name))])

    def _drop_and_settle(self, kind: str, skills: list[Skill]) -> bool:
        t0 = time.monotonic()
        for s in skills:
            s.source = self.inbox.valid_drop(s.name)
            s.blob = self.inbox.blob(s.name)
            s.pinned_mask = None
        return self.settle(kind, t0)

    def act_new_version(self) -> bool:
        return self._drop_and_settle("new version", [self.rng.choice(self.present())])

    def act_burst(self) -> bool:
        present = self.present()
        olds = self.rng.sample(present, min(len(present), self.rng.randint(1, 2)))
        news = [self.skills.setdefault(n, Skill(n)) for n in (self.new_name() for _ in range(
            1 if len(present) < MAX_SKILLS else 0))]
        return self._drop_and_settle("burst of drops", olds + news)

    def act_corrupt(self, kind: str | None = None) -> bool:
        """Drop an unusable file, named after a served skill or not; it must be rejected and change nothing."""
        kind = kind or self.rng.choice(sorted(REASONS))
        targets = [s.name for s in self.present() if not self.inbox.busy(s.name)]
        name = self.rng.choice(targets) if targets and self.rng.random() < 0.5 else f"junk{self.inbox.drops}"
        self.inbox.corrupt_drop(kind, name)
        return self.settle("corrupt drop", time.monotonic(), record=False)  # nothing served changes

    def write_config(self, text: str | None = None) -> None:
        disabled = [s.name for s in self.skills.values() if s.cfg_disabled]
        write_atomic(self.root / "config.toml", (text or config_text(self.port, disabled)).encode())

    def _toggle_target(self, is_off: Callable[[Skill], bool]) -> Skill:
        """A skill to switch: back on (preferred while few are served) or off (while more than the minimum are)."""
        present = self.present()
        off = [s for s in present if is_off(s)]
        on = [s for s in present if s.served] if len(self.served_names()) > MIN_SKILLS else []
        if off and (not on or self.rng.random() < 0.6 or len(self.served_names()) <= MIN_SKILLS):
            return self.rng.choice(off)
        return self.rng.choice(on)

    def act_config_toggle(self) -> bool:
        skill = self._toggle_target(lambda s: s.cfg_disabled)

        def mutate() -> None:
            skill.cfg_disabled = not skill.cfg_disabled

        kind = "config: disable" if not skill.cfg_disabled else "config: enable"
        return self.change(kind, mutate, self.write_config)

    def act_config_invalid(self) -> bool:
        name, edit = INVALID_EDITS[sum(self.invalid_edits.values()) % len(INVALID_EDITS)]
        valid = config_text(self.port, [s.name for s in self.skills.values() if s.cfg_disabled])
        bad = edit(valid)
        assert bad != valid, name
        rejected, applied = self.service.count("config_rejected"), self.service.count("config_applied")
        t0 = time.monotonic()
        self.write_config(bad)
        if not self.wait_for(lambda: self.service.count("config_rejected") != rejected, 15, 0.1,
                             alive="an invalid config edit"):
            self.failures.append(f"invalid config edit ({name}) was not rejected within 15 s")
        elif self.service.count("config_applied") != applied:
            self.failures.append(f"invalid config edit ({name}) was applied")
        self.invalid_edits[name] += 1
        ok = self.settle("config: invalid edit", t0, record=False)  # still serving what it served
        self.write_config()  # put the valid config back
        self.wait_for(lambda: self.service.count("config_applied") != applied, 15, 0.1)
        return ok and self.settle("config: invalid edit", t0)

    def act_api_toggle(self) -> bool:
        skill = self._toggle_target(lambda s: not s.api_enabled)
        enable = not skill.api_enabled

        def mutate() -> None:
            skill.api_enabled = enable

        def act() -> None:
            (self.api.enable if enable else self.api.disable)(skill.name)

        return self.change("http: enable" if enable else "http: disable", mutate, act)

    def _removed(self, skill: Skill) -> None:
        skill.source, skill.api_enabled, skill.pinned_mask = None, True, None  # the registry forgets its settings

    def act_remove_http(self) -> bool:
        skill = self.rng.choice(self.removable())
        return self.change("http: remove", lambda: self._removed(skill), lambda: self.api.remove(skill.name))

    def act_remove_cli(self) -> bool:
        skill = self.rng.choice(self.removable())

        def act() -> None:
            t0 = time.monotonic()
            p = self.service.cli("skills", "remove", skill.name, timeout=120)
            self.cli_runs.append({"rc": p.returncode, "seconds": round(time.monotonic() - t0, 2),
                                  "out": (p.stdout + p.stderr).strip()[-300:]})
            if p.returncode != 0:
                self.failures.append(f"skillhub skills remove {skill.name}: exit {p.returncode}: {p.stderr[-300:]}")

        return self.change("cli: remove", lambda: self._removed(skill), act)

    def act_readd(self) -> bool:
        """Drop a removed skill's last bytes again (the same sha256 as before the remove)."""
        skill = self.rng.choice(self.gone())
        t0 = time.monotonic()
        skill.source = self.inbox.readd(skill.name)
        return self.settle("re-add removed skill", t0)

    def act_pin(self) -> bool:
        views = {v["name"]: v for v in self.api.skills()}
        cands = []
        for s in self.present():
            ready = [v for v in views.get(s.name, {}).get("versions", []) if v["status"] == "READY"]
            if len(ready) >= 2 and s.served:
                cands.append((s, ready))
        if not cands:
            return self.act_new_version()
        skill, ready = self.rng.choice(cands)
        old = self.rng.choice(ready[:-1])

        def pin() -> None:
            skill.pinned_mask = old["mask"]

        def unpin() -> None:
            skill.pinned_mask = None

        return (self.change("http: pin older version", pin, lambda: self.api.pin(skill.name, old["version"]))
                and self.change("http: unpin", unpin, lambda: self.api.pin(skill.name, None)))

    def weights_check(self) -> dict[str, Any]:
        """Compare the served weights with the reference stitch of its manifest now; keep the result."""
        res = check_weights(self.http, self.base, self.base_sha, self.root / "state" / "masks")
        res["at_seconds"] = round(time.monotonic() - self.start_time, 1)
        self.weights_checks.append(res)
        return res

    def act_check_weights(self) -> bool:
        t0 = time.monotonic()
        res = self.weights_check()
        self.actions["check served weights"].append(time.monotonic() - t0)
        if not res["ok"]:
            self.failures.append(f"served weights differ from the reference stitch: {res}")
        return bool(res["ok"])

    # --- the run ---

    def weights(self) -> dict[str, float]:
        """The steps possible now, with their odds."""
        present, served, removable = self.present(), len(self.served_names()), len(self.removable())
        switchable = served > MIN_SKILLS
        return {
            "new_skill": 3.0 if len(present) < MAX_SKILLS else 0.0,
            "new_version": 3.0 if present else 0.0,
            "burst": 0.7 if present else 0.0,
            "corrupt": 2.5,
            "config_toggle": 1.2 if switchable or any(s.cfg_disabled for s in present) else 0.0,
            "config_invalid": 0.6,
            "api_toggle": 1.2 if switchable or any(not s.api_enabled for s in present) else 0.0,
            "remove_http": 0.9 if removable > MIN_SKILLS else 0.0,
            "remove_cli": 0.4 if removable > MIN_SKILLS else 0.0,
            "readd": 1.0 if self.gone() and len(present) < MAX_SKILLS else 0.0,
            "pin": 0.6 if present else 0.0,
        }

    def step(self) -> bool:
        """One step: the first possible one on the agenda (every kind once, so short runs cover them all), else a
        random one."""
        odds = self.weights()
        for i, (action, arg) in enumerate(self.agenda):
            if odds[action] > 0:
                del self.agenda[i]
                break
        else:
            possible = {a: w for a, w in odds.items() if w > 0}
            action, arg = self.rng.choices(list(possible), list(possible.values()))[0], None
        self.note(action + (f" {arg}" if arg else ""))
        return bool(getattr(self, f"act_{action}")(*([arg] if arg else [])))

    def run(self, seconds: float) -> None:
        """Write the config, then take steps for ``seconds``; stop at the first step that fails (it is recorded)."""
        self.start_time = time.monotonic()
        deadline = self.start_time + seconds
        next_weights = self.start_time + WEIGHTS_EVERY
        next_progress = self.start_time + 30
        self.write_config()
        while time.monotonic() < deadline:
            try:
                ok = self.step()
                self.inbox.resolve_corrupt()
                if ok and time.monotonic() >= next_weights:
                    ok = self.act_check_weights()
                    next_weights = time.monotonic() + WEIGHTS_EVERY
            except Exception as e:  # noqa: BLE001 - a failed API call or check ends the driving, and is reported
                self.failures.append(f"driver: {type(e).__name__}: {e}")
                ok = False
            if not ok:
                log("a step failed; stopping the driver: " + (self.failures[-1] if self.failures else "?"))
                return
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + 30
                t = self.traffic.summary(now - self.start_time)
                log(f"{now - self.start_time:5.0f} s: {sum(len(v) for v in self.actions.values())} steps, "
                    f"{len(self.present())} skills, {t['ok_200']} requests ok, {t['failed']} failed, "
                    f"RSS {(self.service.status() or {}).get('rss', 0):.0f} MiB")
            time.sleep(self.rng.uniform(0.1, 0.8))

    def finish(self) -> None:
        """Let every corrupt drop be rejected (a truncated one waits >= 5 s), then check the served set once more."""
        self.wait_for(self.inbox.resolve_corrupt, 60, 0.2)
        self.settle("final state", time.monotonic())

    def close(self) -> None:
        self.api.close()
        self.http.close()
