"""The model table of `summary()`, in the spirit of Keras's.

Each layer reports its own storage figures through `layer.stats()`, so a
pruned, shared, quantized or binary layer from `optim` shows its real
nonzeros, bits per weight and bytes without this table knowing about it.
"""


def _human(n):
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _layer_figures(model):
    """(layer, output shape, MACs, stats) for each layer, the shapes followed from the input."""
    shape = model.input_shape
    for layer in model.layers:
        macs = layer.macs(shape)
        shape = layer.output_shape(shape)
        yield layer, shape, macs, layer.stats()


def _totals(figures):
    out = {"params": 0, "nonzero": 0, "bytes": 0, "macs": 0}
    for _, _, macs, s in figures:
        for key in ("params", "nonzero", "bytes"):
            out[key] += s[key]
        out["macs"] += macs
    out["bits_per_weight"] = 8 * out["bytes"] / out["params"] if out["params"] else 0.0
    return out


def totals(model):
    """The summary's Total row as numbers: params, nonzero, bytes, macs, and
    bits_per_weight = 8 bytes / params (storage, codebooks and biases included)."""
    return _totals(_layer_figures(model))


def format_summary(model):
    """Return the table as a string: one row per layer, then the totals."""
    header = ("Layer", "Output shape", "Params", "Nonzero", "Bits/w", "Bytes", "MACs")
    figures = list(_layer_figures(model))
    rows = [
        (
            f"{i}: {type(layer).__name__}",
            "(N, " + ", ".join(map(str, shape)) + ")",
            f"{s['params']:,}",
            f"{s['nonzero']:,}",
            f"{s['bits_per_weight']:.2f}" if s["params"] else "-",
            f"{s['bytes']:,}",
            f"{macs:,}",
        )
        for i, (layer, shape, macs, s) in enumerate(figures)
    ]
    t = _totals(figures)
    rows.append((
        "Total", "", f"{t['params']:,}", f"{t['nonzero']:,}",
        f"{t['bits_per_weight']:.2f}", f"{t['bytes']:,}", f"{t['macs']:,}",
    ))
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))

    def fmt(r):
        return "  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))

    return "\n".join(
        [fmt(header), line] + [fmt(r) for r in rows[:-1]] + [line, fmt(rows[-1]),
         f"Weights: {_human(t['bytes'])}; input (N, {', '.join(map(str, model.input_shape))})"]
    )
