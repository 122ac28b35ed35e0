"""Static checks of PromQL expressions against the metrics earshot exports (known_metrics.py).

`problems(expr)` parses an expression with promql_parser and walks its AST: every selector must
name a known metric, match only on labels that metric has (plus `instance`/`job`, and `le` on
`_bucket`), use only values of closed label sets (result, outcome, reason, task, path), and every
`by (...)` of an aggregation must name labels the series under it carry.
"""

from __future__ import annotations

import re

import promql_parser

from tests.ops.known_metrics import LABEL_VALUES, SeriesName, resolve

# A regex matcher value that is a plain alternation of literals: `capacity|memory`.
_ALTERNATION = re.compile(r"[\w/{}:.\-]+(\|[\w/{}:.\-]+)*")


def _selector_name(node: promql_parser.VectorSelector) -> str | None:
    if node.name:
        return node.name
    for m in node.matchers.matchers:
        if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
            return m.value
    return None


def selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (unparseable: raises ValueError)."""
    return {name for s in selectors(promql_parser.parse(expr)) if (name := _selector_name(s))}


def _matcher_problems(node: promql_parser.VectorSelector, series: SeriesName) -> list[str]:
    out = []
    for m in node.matchers.matchers:
        if m.name == "__name__":
            continue
        if m.name not in series.labels:
            out.append(f"{series.metric.name} has no label {m.name!r} (has {sorted(series.labels)})")
            continue
        allowed = LABEL_VALUES.get(m.name)
        if allowed is None:
            continue
        if m.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
            values = [m.value]
        elif _ALTERNATION.fullmatch(m.value):
            values = m.value.split("|")
        else:
            continue  # a real regex (".*", "$instance" substituted): nothing to check
        out += [f"{m.name}={v!r} is not one of {sorted(allowed)}" for v in values if v not in allowed]
    return out


def problems(expr: str) -> list[str]:
    """What is wrong with `expr` (an empty list: nothing)."""
    try:
        ast = promql_parser.parse(expr)
    except ValueError as e:
        return [f"does not parse: {e}"]
    out: list[str] = []
    for node in selectors(ast):
        name = _selector_name(node)
        if name is None:
            out.append(f"selector without a metric name: {node}")
            continue
        series = resolve(name)
        if series is None:
            out.append(f"unknown metric {name!r}")
            continue
        out += _matcher_problems(node, series)

    def visit(node: promql_parser.Expr) -> None:
        if not isinstance(node, promql_parser.AggregateExpr) or node.modifier is None:
            return
        if node.modifier.type != promql_parser.AggModifierType.By:
            return
        carried: set[str] = set()
        for s in selectors(node.expr):
            name = _selector_name(s)
            series = resolve(name) if name else None
            if series is not None:
                carried |= series.labels
        missing = [label for label in node.modifier.labels if label not in carried]
        if missing:
            out.append(f"aggregation by {missing}: no series under it has those labels ({sorted(carried)})")

    promql_parser.walk(ast, visit)
    return out
