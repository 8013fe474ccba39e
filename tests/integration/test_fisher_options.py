"""The Fisher options have one definition (fishmerge.fisher.options.FisherOptions): FisherSpec's
defaults, the spec check and the `fishmerge fisher` flags read it; the estimators are a registry that
feeds the flag's choices and the config's Literal."""

from __future__ import annotations

import argparse
import typing
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from fishmerge import __version__
from fishmerge.errors import FishmergeError
from fishmerge.fisher.estimators import ESTIMATORS, get_estimator
from fishmerge.fisher.job import FisherSpec, Resolved, check_spec, fisher_id
from fishmerge.fisher.options import FisherOptions
from fishmerge.flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_spec_defaults_are_the_options_defaults() -> None:
    spec = FisherSpec(model="m", data="d")
    for name, info in FisherOptions.model_fields.items():
        assert getattr(spec, name) == info.get_default(call_default_factory=True), name
    # the field order (it is the order of the `spec` attribute in every store) is unchanged
    assert [f.name for f in fields(FisherSpec)] == [
        "model",
        "data",
        "split",
        "text_fields",
        "label_field",
        "estimator",
        "examples",
        "seed",
        "batch_size",
        "max_length",
        "device",
        "dtype",
        "max_memory",
        "fallback",
        "messages_field",  # appended (issue 13): the earlier fields keep their order
        "statistics",  # appended (issue 14)
    ]


def test_spec_round_trips_and_the_fisher_id_is_unchanged() -> None:
    spec = FisherSpec(model="m", data="d")
    assert FisherSpec(**asdict(spec)) == spec
    r = Resolved(spec, "fid", "mfp", "dfp", "sequence_classification", "label", [0, 2], "/tmp/s.zarr")
    assert Resolved.from_dict(r.to_dict()) == r
    # ids computed by fishmerge before the options moved to one definition: stores stay addressable
    # (`resolve` names a Fisher by what `auto` stands for: a classifier's default is `exact`, as before)
    exact = FisherSpec(model="m", data="d", estimator="exact")
    assert fisher_id("sha256:model", "sha256:data", exact, 1000, "label") == "ffce1be0da136fee6fb361aea"
    other = FisherSpec(model="m", data="d", estimator="sampled", seed=3, max_length=64, text_fields=["a", "b"])
    assert fisher_id("sha256:model", "sha256:data", other, 17, None) == "f43c758f554f3453a6d7dc50a"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "--batch-size must be ≥ 1, got 0"),
        ({"max_length": 1}, "--max-length must be ≥ 2, got 1"),
        ({"examples": 0}, "--examples must be ≥ 1, got 0"),
        ({"max_memory": 0}, "--max-memory must be ≥ 1, got 0"),
        ({"max_memory": "lots"}, "--max-memory: not a size: 'lots'"),
        ({"estimator": "fancy"}, "--estimator: input should be 'auto', 'exact', 'sampled' or 'empirical', got 'fancy'"),
        ({"batch_size": 2.5}, "--batch-size: input should be a valid integer"),
        ({"dtype": "int8"}, "--dtype: input should be"),
    ],
)
def test_check_spec_names_the_flag_in_one_line(change, message) -> None:
    with pytest.raises(FishmergeError) as info:
        check_spec(FisherSpec(model="m", data="d", **change))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_check_spec_takes_every_row_and_sizes() -> None:
    assert check_spec(FisherSpec(model="m", data="d", examples=None)).examples is None
    assert check_spec(FisherSpec(model="m", data="d", max_memory="256MB")).max_memory == 256 * 10**6


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_fisher_flags_come_from_the_options() -> None:
    f = _subparser("fisher")
    flags = {a.dest: a for a in f._actions}
    help_text = f.format_help()
    for name, info in FisherOptions.model_fields.items():
        action = flags[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        default = info.get_default(call_default_factory=True)
        assert action.default == (",".join(default) if isinstance(default, list) else default)
        assert info.description.split(" ")[0] in action.help
        if typing.get_origin(info.annotation) is typing.Literal:
            assert list(action.choices) == list(typing.get_args(info.annotation))
    assert list(flags["estimator"].choices) == ["auto", *ESTIMATORS]
    assert "(default: auto)" in help_text and "(default: 16)" in help_text
    assert f.parse_args(["--model", "m", "--data", "d"]).statistics == ["fisher"]
    assert f.parse_args(["--model", "m", "--data", "d", "--statistics", "gram, fisher"]).statistics == [
        "fisher",
        "gram",
    ]
    args = f.parse_args(["--model", "m", "--data", "d", "--max-memory", "256MB", "--examples", "7"])
    assert args.max_memory == 256 * 10**6 and args.examples == 7
    assert f.parse_args(["--model", "m", "--data", "d"]).max_memory == FisherOptions.model_fields["max_memory"].default


def test_every_flag_has_help_with_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = formatter._get_help_string(action)
            if action.default is not None and action.default is not False and action.option_strings:
                assert "default" in shown, f"{name} {action.option_strings} does not show its default"


def test_bad_option_flag_is_one_error_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fisher", "--model", "m", "--data", "d", "--batch-size", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fishmerge: error: argument --batch-size: must be ≥ 1, got 0")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fishmerge {__version__}"


def test_estimators_are_a_registry() -> None:
    from fishmerge.merge.config import FisherSection

    assert ESTIMATORS == ("exact", "sampled", "empirical")
    assert typing.get_args(FisherSection.model_fields["estimator"].annotation) == ("auto", *ESTIMATORS)
    assert [n for n in ESTIMATORS if get_estimator(n).uses_labels] == ["empirical"]
    with pytest.raises(FishmergeError, match="unknown estimator 'fancy': choose one of exact, sampled, empirical"):
        get_estimator("fancy")


def test_no_branch_on_an_estimator_name_outside_the_registry() -> None:
    found = []
    for folder in ("lib", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "estimators.py" and path.parent.name == "fisher":
                continue
            text = path.read_text()
            found += [f"{path.relative_to(ROOT)}: {n}" for n in ESTIMATORS for q in "\"'" if f"{q}{n}{q}" in text]
    assert not found, found
