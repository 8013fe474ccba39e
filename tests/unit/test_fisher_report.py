"""Per-layer grouping and ordering used by the artifact, the plot and `fishmerge inspect`."""

from fishmerge.fisher.report import layer_mass, layer_of


def test_layer_of_groups_by_transformer_layer() -> None:
    assert layer_of("bert.encoder.layer.3.attention.self.query.weight") == "bert.encoder.layer.3"
    assert layer_of("model.layers.11.mlp.up_proj.weight") == "model.layers.11"
    assert layer_of("transformer.h.0.attn.c_attn.weight") == "transformer.h.0"
    assert layer_of("bert.embeddings.word_embeddings.weight") == "bert.embeddings"
    assert layer_of("classifier.weight") == "classifier"


def test_layer_mass_sums_and_orders_like_the_network() -> None:
    rows = [
        {"tensor": "classifier.weight", "mass": 1.0},
        {"tensor": "bert.encoder.layer.10.output.dense.weight", "mass": 2.0},
        {"tensor": "bert.encoder.layer.2.output.dense.weight", "mass": 3.0},
        {"tensor": "bert.encoder.layer.2.output.dense.bias", "mass": 0.5},
        {"tensor": "bert.embeddings.word_embeddings.weight", "mass": 4.0},
    ]
    masses = layer_mass(rows)
    assert list(masses) == ["bert.embeddings", "bert.encoder.layer.2", "bert.encoder.layer.10", "classifier"]
    assert masses["bert.encoder.layer.2"] == 3.5


def test_png_markdown_inline_by_name_or_named_when_it_cannot_be_shown(tmp_path, monkeypatch) -> None:
    """Inline: a data: URI that decodes to the file's bytes; else the file name (report.md beside it); a
    plot over the inline limit or unreadable is named by its path, never read unbounded."""
    import base64

    from fishmerge.fisher import report

    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    inline = report.png_markdown(str(png), "a plot", inline=True)
    assert inline.startswith("![a plot](data:image/png;base64,") and inline.endswith(")")
    assert base64.b64decode(inline.split(",", 1)[1][:-1]) == png.read_bytes()
    assert report.png_markdown(str(png), "a plot", inline=False) == "![a plot](plot.png)"
    assert (
        report.png_markdown(str(tmp_path / "gone.png"), "a plot", inline=True) == f"a plot: `{tmp_path / 'gone.png'}`"
    )
    monkeypatch.setattr(report, "MAX_INLINE_PNG", png.stat().st_size - 1)
    assert report.png_markdown(str(png), "a plot", inline=True) == f"a plot: `{png}`"


def test_inline_plots_share_one_budget(tmp_path, monkeypatch) -> None:
    """An artifact's plots are inlined while their total stays within MAX_INLINE_PNGS; the rest are
    named by their paths (the artifact stays bounded however many plots a run makes)."""
    import base64
    import re

    from fishmerge.fisher import report
    from fishmerge.pipeline.report import report_markdown

    plots = []
    for i in range(3):
        plots.append(tmp_path / f"plot_{i}.png")
        plots[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]) * 1000)
    monkeypatch.setattr(report, "MAX_INLINE_PNGS", 2100)  # room for two plots of 1008 bytes, not three
    md = report_markdown(
        "run", "isotropic", ["a", "b"], [0.5, 0.5], {}, {}, {}, {}, [str(p) for p in plots], None, True
    )
    shown = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert [base64.b64decode(s) for s in shown] == [p.read_bytes() for p in plots[:2]]
    assert f"plot 2: `{plots[2]}`" in md
    assert report.png_markdown(str(plots[0]), "p", inline=True, limit=1007) == f"p: `{plots[0]}`"
