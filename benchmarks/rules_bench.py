"""Rules benchmark: 1,000 rules and 100,000 directory users in one tenant (issue #4).

Measures load time, rule evaluation per message (after warm-up: the per-sender candidate cache)
against a naive linear scan of all rules for every recipient, and rendering per message.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.policy import Policy
from relay.rules import Message, _rule_matches

DEPARTMENTS = ["Sales", "Support", "Finance", "Legal", "Engineering", "Marketing", "HR", "Operations"]


def build(root: Path, users: int = 100_000, rules: int = 1000, groups: int = 100) -> None:
    tdir, sdir = root / "rules" / "t", root / "signatures" / "t"
    tdir.mkdir(parents=True)
    sdir.mkdir(parents=True)
    rnd = random.Random(7)
    lines = ["mail,displayName,jobTitle,department,businessPhones,mobilePhone,officeLocation"]
    for i in range(users):
        lines.append(f"u{i}@contoso.com,User {i},Title {i % 50},{DEPARTMENTS[i % 8]},+1 555 {i:06d},,Office {i % 20}")
    (tdir / "directory.csv").write_text("\n".join(lines) + "\n")
    gl = []
    for g in range(groups):
        members = ", ".join(f'"u{m}@contoso.com"' for m in range(g * 1000, g * 1000 + 1000))
        gl.append(f'[[group]]\nname = "G{g}"\nmembers = [{members}]\n')
    (tdir / "groups.toml").write_text("\n".join(gl))
    rl = []
    for r in range(rules):
        kind = r % 4
        senders = [f'{{ groups = ["G{rnd.randrange(groups)}"] }}',
                   f'{{ where = [{{ attribute = "department", equals = "{DEPARTMENTS[r % 8]}" }}], '
                   f'except_users = ["u{rnd.randrange(users)}@contoso.com"] }}',
                   f'{{ users = ["u{rnd.randrange(users)}@contoso.com", "u{rnd.randrange(users)}@contoso.com"] }}',
                   '{ domains = ["contoso.com"] }'][kind]
        scope = ["external", "internal", "all"][r % 3]
        rl.append(f'[[rule]]\nname = "R{r}"\nsenders = {senders}\nrecipients = {{ scope = "{scope}" }}\n'
                  f'keywords = {{ suppress = ["[nosig{r}]"] }}\nnew = "sig"\nreply = "sig"\n'
                  f'stop = {"true" if r % 50 == 49 else "false"}\n'
                  f'section = "{["signature", "banner", "disclaimer"][r % 3]}"\n')
    (tdir / "rules.toml").write_text("\n".join(rl))
    (sdir / "sig.html.j2").write_text(
        "<table><tr><td><b>{{ user.displayName }}</b><br>\n{{ user.jobTitle }}<br>\n{{ user.department }}<br>\n"
        "T {{ user.businessPhones }}<br>\nM {{ user.mobilePhone }}<br>\n{{ user.officeLocation }}</td></tr></table>\n")


def naive(policy: Policy, msg: Message, recipients: list[str]) -> list[tuple[str, ...]]:
    """Every rule, every recipient, no caches: what a straightforward implementation does
    (same semantics: one section of each kind, stop ends the evaluation)."""
    out = []
    s_user = policy.directory.user(msg.sender)
    for r in recipients:
        r_user = policy.directory.user(r)
        internal = policy.rules.internal(r)
        filled: dict[str, str] = {}
        for rule in policy.rules.rules:
            if rule.enabled and rule.senders.matches(msg.sender, s_user, True) and \
                    _rule_matches(rule, msg, r, r_user, internal):
                filled.setdefault(rule.section, rule.name)
                if rule.stop:
                    break
        out.append(tuple(sorted(filled.values())))
    return out


def per_call(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Best and median seconds per call over 5 batches of ``n``."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n)
    return min(runs), statistics.median(runs)


def main() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        build(root)
        t0 = time.perf_counter()
        policy = Policy.load("t", root / "rules" / "t", root / "signatures" / "t", frozenset({"contoso.com"}))
        load = time.perf_counter() - t0
        senders = [f"u{i}@contoso.com" for i in random.Random(1).sample(range(100_000), 200)]
        rcpts = ["a@example.net", "u5@contoso.com", "b@example.org"]
        at = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
        msgs = [Message(s, "Hello", "body", "new", at) for s in senders]
        for m in msgs:  # warm-up: per-sender candidate cache
            policy.plan(m, rcpts)
        it = iter(range(1 << 60))
        best_eval, med_eval = per_call(lambda: policy.plan(msgs[next(it) % 200], rcpts), 2000)
        best_naive, _ = per_call(lambda: naive(policy, msgs[next(it) % 200], rcpts), 50)
        outcome, group = policy.plan(msgs[0], rcpts)[0]
        t0 = time.perf_counter()
        policy.render(outcome, msgs[0], group)
        first_render = time.perf_counter() - t0
        for m in msgs:
            policy.render(outcome, m, group)
        best_render, med_render = per_call(lambda: policy.render(outcome, msgs[next(it) % 200], group), 2000)
        agree = all(
            [tuple(sorted(s.rule for s in policy.rules.outcome(policy.directory, m, r))) for r in rcpts]
            == naive(policy, m, rcpts) for m in msgs)
        cold = Message("u99999@contoso.com", "Hello", "body", "new", at)
        t0 = time.perf_counter()
        policy.plan(cold, rcpts)
        first = time.perf_counter() - t0
        return [
            f"rules (1,000 rules, 100,000 users, 100 groups of 1,000): load {load:.2f} s",
            f"rule evaluation, 3 recipients: {best_eval * 1e6:,.1f} µs best / {med_eval * 1e6:,.1f} µs median per "
            f"message; naive linear scan {best_naive * 1e6:,.0f} µs; naive/ours = {best_naive / best_eval:,.0f}"
            f" (same outcomes on 200 senders: {agree}); first message of a new sender {first * 1e6:,.0f} µs",
            f"rendering one signature (after warm-up, memoised per sender): {best_render * 1e6:,.1f} µs best / "
            f"{med_render * 1e6:,.1f} µs median; first render {first_render * 1e6:,.0f} µs",
        ]


if __name__ == "__main__":
    print("\n".join(main()))
