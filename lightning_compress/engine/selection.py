r"""Choosing which parameters or modules a compression method touches.

Names are the full dotted names that ``named_parameters()`` / ``named_modules()`` return (``"fc1.weight"``,
``"encoder.layers.0.linear1"``). ``include`` and ``exclude`` are lists of regular expressions, each searched with
``re.search`` in a name: a name is selected when it is a default candidate (or matches ``include``, when given) and
matches no ``exclude`` pattern.

``include`` narrows the default candidates: a pattern selects the candidates it matches (``transformer\.h\.``
selects the Linear/Conv weights of those blocks, not their LayerNorm weights and biases). A pattern that matches no
candidate selects the other names it matches, so other parameters can still be targeted on purpose
(``^embed\.weight$``, ``fc1\.bias``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

#: Module types whose ``weight`` is pruned or quantized by default. Biases and normalization layers never are.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compile_patterns(name: str, patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    """Compile ``patterns`` (one string or a list), raising an error that names the argument on a bad regex."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` must be a list of regular expressions (strings), got {pattern!r}.")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{name}` has an invalid regular expression {pattern!r}: {err}.") from None
    return compiled


def filter_names(
    candidates: Sequence[str],
    all_names: Sequence[str],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    what: str = "parameter",
) -> list[str]:
    """Apply ``include``/``exclude`` to names and fail clearly when nothing is left.

    Args:
        candidates: The names selected by default (e.g. every Linear/Conv weight).
        all_names: Every name ``include`` may pick from (so it can select e.g. a bias on purpose).
        include: Patterns; when given, each selects the candidates it matches, or, if it matches no candidate,
            the names of ``all_names`` it matches.
        exclude: Patterns; names matching any of them are dropped.
        what: Word used in error messages ("parameter" or "module").

    Returns:
        The selected names, in model order.

    Raises:
        ValueError: If a pattern matches nothing, or the final selection is empty. The message lists the names
            that exist.
    """
    include_re = compile_patterns("include", include)
    exclude_re = compile_patterns("exclude", exclude)
    for arg, pats in (("include", include_re), ("exclude", exclude_re)):
        for pat in pats:
            if not any(pat.search(n) for n in all_names):
                raise ValueError(
                    f"`{arg}` pattern {pat.pattern!r} matches no {what} name. {_available(what, all_names)}"
                )
    pool = list(candidates)
    if include_re:
        picked: set[str] = set()
        for pattern in include_re:
            matched = {n for n in candidates if pattern.search(n)}
            picked |= matched or {n for n in all_names if pattern.search(n)}
        pool = [n for n in all_names if n in picked]
    selected = [n for n in pool if not any(p.search(n) for p in exclude_re)]
    if not selected:
        raise ValueError(
            f"The selection (`include`={include!r}, `exclude`={exclude!r}) leaves no {what} to compress. "
            f"{_available(what, all_names)}"
        )
    return selected


def _available(what: str, names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"Available {what} names: {shown}."


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, nn.Parameter]:
    r"""Return the parameters to prune, by full name.

    By default every ``weight`` of ``nn.Linear`` and ``nn.ConvNd`` modules (subclasses included). ``include`` narrows
    them to the weights its patterns match; a pattern that matches none of those weights selects the other
    parameters it matches (a bias, a LayerNorm or embedding weight, on purpose). ``exclude`` always wins.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> list(select_parameters(net, include=[r"^0\.", r"^1\."]))  # "0." is a Linear: its weight; "1." a norm
        ['0.weight', '1.weight', '1.bias']
        >>> list(select_parameters(net, include=[r"^0\.bias$"]))
        ['0.bias']
    """
    named = dict(model.named_parameters())
    candidates = [
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, module in model.named_modules()
        if isinstance(module, layer_types) and isinstance(getattr(module, "weight", None), nn.Parameter)
    ]
    candidates = [n for n in candidates if n in named]  # shared modules appear once in named_parameters
    names = filter_names(candidates, list(named), include, exclude, what="parameter")
    return {n: named[n] for n in names}


def select_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, nn.Module]:
    """Return the modules of ``layer_types`` to quantize, by full name, with the same include/exclude rules."""
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if n and isinstance(m, layer_types)]
    names = filter_names(candidates, candidates, include, exclude, what="module")
    return {n: modules[n] for n in names}


def output_layer_weight(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES) -> str | None:
    """The name of the weight of the model's output layer: the last Linear/Conv module in definition order.

    Its output channels are the network's outputs (class scores), so channel pruning must never remove them. This
    is the convention of nearly every model (the head is defined last); a model that defines its head earlier
    should ``exclude`` it explicitly.

    Examples:
        >>> output_layer_weight(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
        '2.weight'
    """
    names = [n for n, m in model.named_modules() if isinstance(m, layer_types)]
    return f"{names[-1]}.weight" if names and names[-1] else ("weight" if names else None)
