"""The request's options are declared once (pipelines/options.py) and every surface derives from that
table: the command line's flags, the HTTP bodies, the A1111 names, Request's defaults and its checks."""

import dataclasses

import pytest

from pipelines.cli import build_parser
from pipelines.options import KINDS, OPTIONS, flag, options_for
from pipelines.request import Request


def _flags(command: str) -> dict:
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize("kind, command", [("txt2img", "generate"), ("img2img", "img2img"), ("inpaint", "inpaint")])
def test_every_option_is_a_flag_of_its_commands_with_its_default_and_help(kind, command):
    flags = _flags(command)
    for name, o in OPTIONS.items():
        if o.cli and kind in o.kinds:
            a = flags[name]
            assert a.option_strings == [flag(name)] + ([f"--no-{flag(name)[2:]}"] if o.type is bool else []) and a.help
            if name != "strength":  # img2img / inpaint say their own default strength
                assert a.default == o.default and o.help == a.help, name
        else:
            assert name not in flags, (name, command)


def test_the_http_bodies_hold_the_options_that_are_http_ones():
    from pipelines.serve import EditBody, Img2Img, Txt2Img

    for model, kinds in ((Txt2Img, ("txt2img",)), (Img2Img, ("img2img", "inpaint"))):
        fields = set(model.model_fields) - {"prompt", "image", "mask", "lora", "controls"}
        assert fields == {n for kind in kinds for n in options_for(kind, "http")}, model
        for name in fields:
            assert model.model_fields[name].default == OPTIONS[name].default
    assert "clip_model" not in EditBody.model_fields  # a server path is never a client's to give


def test_request_defaults_and_a1111_names_come_from_the_table():
    from pipelines.a1111 import FIELD_NAMES

    defaults = {f.name: f.default for f in dataclasses.fields(Request)}
    for name, o in OPTIONS.items():
        assert defaults[name] == o.default, name
        assert o.kinds and set(o.kinds) <= set(KINDS)
        if o.a1111:
            assert FIELD_NAMES[name] == o.a1111


@pytest.mark.parametrize("name, value, message", [
    ("eta", 1.5, "must be between 0 and 1, got 1.5"),
    ("cache_interval", 0, "must be an integer >= 1, got 0"),
    ("n_iter", True, "must be an integer >= 1, got True"),
    ("hires_upscaler", "bicubic", "no upscaler 'bicubic'; available: latent, lanczos (model upscalers are named from "
                                  "--upscalers-dir, or given as a file's path)"),
    ("clip_guidance_scale", -1.0, "must be a number >= 0, got -1.0"),
])
def test_plain_checks_come_from_the_table(name, value, message):
    problems = dict(Request(prompt="a", **{name: value}).validate())
    assert problems[name] == message
