"""The command line in-process: `main()` called with argument lists, its output read with capsys.
Argument errors name the option and the close one and exit 2, `--version` names the program and
Python, and a bad setting is told in one sentence with the way to see every option."""

import neuromesh as nm


def test_version_names_the_program_and_python(capsys):
    assert nm.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert nm.__version__ in out
    assert "Python" in out


def test_a_misspelt_option_is_named_with_the_close_one(capsys):
    assert nm.main(["--http-prot", "8081"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --http-prot" in err
    assert "did you mean --http-port?" in err
    assert "--help" in err


def test_an_option_far_from_any_is_named_without_a_guess(capsys):
    assert nm.main(["--zzzzqqq"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --zzzzqqq" in err
    assert "did you mean" not in err


def test_options_after_a_double_dash_are_not_judged():
    parser = nm.build_arg_parser()
    assert nm.unknown_option(parser, ["--", "--http-prot"]) is None
    assert nm.unknown_option(parser, ["--http-port=8081"]) is None
