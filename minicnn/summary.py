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


def format_summary(model):
    """Return the table as a string: one row per layer, then the totals."""
    header = ("Layer", "Output shape", "Params", "Nonzero", "Bits/w", "Bytes", "MACs")
    rows, shape = [], model.input_shape
    totals = {"params": 0, "nonzero": 0, "bytes": 0, "macs": 0}
    for i, layer in enumerate(model.layers):
        macs = layer.macs(shape)
        shape = layer.output_shape(shape)
        s = layer.stats()
        for key in ("params", "nonzero", "bytes"):
            totals[key] += s[key]
        totals["macs"] += macs
        rows.append((
            f"{i}: {type(layer).__name__}",
            "(N, " + ", ".join(map(str, shape)) + ")",
            f"{s['params']:,}",
            f"{s['nonzero']:,}",
            f"{s['bits_per_weight']:.2f}" if s["params"] else "-",
            f"{s['bytes']:,}",
            f"{macs:,}",
        ))
    bits = 8 * totals["bytes"] / totals["params"] if totals["params"] else 0.0
    rows.append((
        "Total", "", f"{totals['params']:,}", f"{totals['nonzero']:,}",
        f"{bits:.2f}", f"{totals['bytes']:,}", f"{totals['macs']:,}",
    ))
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))

    def fmt(r):
        return "  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))

    return "\n".join(
        [fmt(header), line] + [fmt(r) for r in rows[:-1]] + [line, fmt(rows[-1]),
         f"Weights: {_human(totals['bytes'])}; input (N, {', '.join(map(str, model.input_shape))})"]
    )
