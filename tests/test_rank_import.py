"""rank-import: every rankings format to the exact expected pairs, every validation error through
the CLI, multiple annotators, policies, the split and the outputs."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from rlhfkit.rankings import detect_format, parse_ranking_string
from rlhfkit.stages.rank_import import is_validation, val_out_path

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _samples() -> list[dict]:
    """p1, p2: plain prompts with four completions each (a, b from 'sft', c, d from 'ppo');
    p3: a chat prompt with two completions."""
    out = []
    for pid in ("p1", "p2"):
        completions = [
            {
                "id": f"{pid}-{c}",
                "text": f"Answer {c} of {pid}.",
                "policy": "sft" if c in "ab" else "ppo",
                "finish_reason": "stop",
            }
            for c in "abcd"
        ]
        out.append({"prompt_id": pid, "prompt": f"Question {pid}?", "completions": completions})
    out.append(
        {"prompt_id": "p3", "prompt": CHAT, "completions": [{"id": "p3-a", "text": "Red."}, {"id": "p3-b", "text": "Blue."}]}
    )
    return out


@pytest.fixture()
def samples_file(tmp_path):
    return write_jsonl(tmp_path / "samples.jsonl", _samples())


def _write(path, records) -> str:
    if isinstance(records, str):
        path.write_text(records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    else:
        write_jsonl(path, records)
    return str(path)


def _import(cli, tmp_path, samples_file, records, *args, name="rankings.jsonl", expect_ok=True):
    rankings = _write(tmp_path / name, records)
    out = tmp_path / "pairs.jsonl"
    result = cli("rank-import", rankings, "--samples", samples_file, "--out", out, "--bootstrap", "20", *args)
    if not expect_ok:
        return result, None
    assert result.exit_code == 0, result.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    return result, pairs


def _ids(pairs) -> list[tuple[str, str]]:
    return [(p["chosen_id"], p["rejected_id"]) for p in pairs]


# --- formats ------------------------------------------------------------------------------------


def test_native_ranking_of_four_gives_six_pairs(cli, tmp_path, samples_file):
    result, pairs = _import(
        cli, tmp_path, samples_file, [{"prompt_id": "p1", "ranking": ["p1-c", "p1-a", "p1-d", "p1-b"], "annotator": "ann-2"}]
    )
    assert _ids(pairs) == [
        ("p1-c", "p1-a"),
        ("p1-c", "p1-d"),
        ("p1-c", "p1-b"),
        ("p1-a", "p1-d"),
        ("p1-a", "p1-b"),
        ("p1-d", "p1-b"),
    ]
    assert pairs[0] == {
        "prompt": "Question p1?",
        "chosen": "Answer c of p1.",
        "rejected": "Answer a of p1.",
        "group": "p1/ann-2",
        "annotator": "ann-2",
        "chosen_policy": "ppo",
        "rejected_policy": "sft",
        "chosen_finish_reason": "stop",
        "rejected_finish_reason": "stop",
        "prompt_id": "p1",
        "chosen_id": "p1-c",
        "rejected_id": "p1-a",
    }
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 6 and summary["format"] == "native" and summary["judgements"] == 1
    assert "format auto -> native" in result.stderr


def test_a_tie_of_two_gives_five_pairs_or_a_margin_zero_pair(cli, tmp_path, samples_file):
    ranking = [{"prompt_id": "p1", "ranking": ["p1-a", ["p1-b", "p1-c"], "p1-d"]}]
    _, pairs = _import(cli, tmp_path, samples_file, ranking)
    assert _ids(pairs) == [("p1-a", "p1-b"), ("p1-a", "p1-c"), ("p1-a", "p1-d"), ("p1-b", "p1-d"), ("p1-c", "p1-d")]
    assert all("margin" not in p for p in pairs) and pairs[0]["group"] == "p1" and "annotator" not in pairs[0]
    _, pairs = _import(cli, tmp_path, samples_file, ranking, "--tie-pairs")
    assert len(pairs) == 6 and _ids(pairs)[-1] == ("p1-b", "p1-c") and pairs[-1]["margin"] == 0.0


@pytest.mark.parametrize("best", ["p1-c", 2], ids=["id", "index"])
def test_best_of_four_gives_three_pairs(cli, tmp_path, samples_file, best):
    result, pairs = _import(cli, tmp_path, samples_file, [{"prompt_id": "p1", "best": best}])
    assert _ids(pairs) == [("p1-c", "p1-a"), ("p1-c", "p1-b"), ("p1-c", "p1-d")]
    assert "format auto -> best-of-k" in result.stderr
    # the unordered rest is no tie: --tie-pairs adds nothing
    _, pairs = _import(cli, tmp_path, samples_file, [{"prompt_id": "p1", "best": best}], "--tie-pairs")
    assert len(pairs) == 3


def test_scores_become_a_ranking_with_optional_margins(cli, tmp_path, samples_file):
    scores = [{"prompt_id": "p1", "scores": {"p1-a": 2, "p1-b": 6, "p1-c": 2, "p1-d": 7}, "annotator": "x"}]
    result, pairs = _import(cli, tmp_path, samples_file, scores)
    # d(7) > b(6) > a(2) = c(2)
    assert _ids(pairs) == [("p1-d", "p1-b"), ("p1-d", "p1-a"), ("p1-d", "p1-c"), ("p1-b", "p1-a"), ("p1-b", "p1-c")]
    assert "format auto -> scores" in result.stderr and all("margin" not in p for p in pairs)
    _, pairs = _import(cli, tmp_path, samples_file, scores, "--score-margin", "--tie-pairs")
    assert [p["margin"] for p in pairs] == [1.0, 5.0, 5.0, 4.0, 4.0, 0.0]


def test_pairwise_flavours(cli, tmp_path, samples_file):
    records = [
        # standard: prompt + completion texts
        {"prompt": "Question p1?", "chosen": "Answer b of p1.", "rejected": "Answer a of p1.", "annotator": "x"},
        # implicit prompt: the shared beginning of two transcripts
        {"chosen": "Question p2?Answer d of p2.", "rejected": "Question p2?Answer c of p2.", "annotator": "x"},
        # conversational: message lists
        {
            "prompt": CHAT,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Red."}],
        },
        # completion ids
        {"chosen": "p1-c", "rejected": "p1-d", "annotator": "y"},
    ]
    result, pairs = _import(cli, tmp_path, samples_file, records)
    assert _ids(pairs) == [("p1-b", "p1-a"), ("p2-d", "p2-c"), ("p3-b", "p3-a"), ("p1-c", "p1-d")]
    assert pairs[2]["prompt"] == CHAT and pairs[2]["chosen"] == "Blue."
    assert "format auto -> pairwise" in result.stderr
    # implicit prompt in the conversational flavour: whole conversations
    chosen, rejected = CHAT + [{"role": "assistant", "content": "Red."}], CHAT + [{"role": "assistant", "content": "Blue."}]
    _, pairs = _import(cli, tmp_path, samples_file, [{"chosen": chosen, "rejected": rejected}])
    assert _ids(pairs) == [("p3-a", "p3-b")]


def _label_studio_export() -> list[dict]:
    items = [{"id": f"p1-{c}", "title": c, "body": f"Answer {c} of p1."} for c in "abcd"]
    ranker = {"type": "ranker", "from_name": "rank", "to_name": "results"}
    return [
        {
            "id": 1,
            "data": {"prompt_id": "p1", "prompt": "Question p1?", "items": items},
            "annotations": [
                {"completed_by": 7, "result": [{**ranker, "value": {"ranker": {"results": ["p1-b", "p1-a", "p1-c", "p1-d"]}}}]},
                {
                    "completed_by": {"email": "ann@example.org"},
                    "result": [{**ranker, "value": {"ranker": ["p1-a", "p1-b", "p1-c", "p1-d"]}}],
                },
                {"completed_by": 9, "was_cancelled": True, "result": []},
            ],
        },
        {  # buckets: tiers in export order, items of one bucket tie, "_" (unsorted) ignored
            "id": 2,
            "data": {"prompt_id": "p2", "items": items},
            "annotations": [
                {
                    "completed_by": 7,
                    "result": [{**ranker, "value": {"ranker": {"good": ["p2-d"], "bad": ["p2-a", "p2-b"], "_": ["p2-c"]}}}],
                }
            ],
        },
        {  # Pairwise: the task's two sides, "selected" names the better one
            "id": 3,
            "data": {"prompt": "Question p1?", "left": "Answer a of p1.", "right": "Answer c of p1."},
            "annotations": [
                {
                    "completed_by": 8,
                    "result": [{"type": "pairwise", "from_name": "pw", "to_name": "pw", "value": {"selected": "right"}}],
                }
            ],
        },
    ]


def test_label_studio_export(cli, tmp_path, samples_file):
    result, pairs = _import(cli, tmp_path, samples_file, _label_studio_export(), name="export.json")
    by_annotator = {}
    for p in pairs:
        by_annotator.setdefault(p["annotator"], []).append((p["chosen_id"], p["rejected_id"]))
    assert by_annotator["7"][:6] == [
        ("p1-b", "p1-a"),
        ("p1-b", "p1-c"),
        ("p1-b", "p1-d"),
        ("p1-a", "p1-c"),
        ("p1-a", "p1-d"),
        ("p1-c", "p1-d"),
    ]
    assert by_annotator["7"][6:] == [("p2-d", "p2-a"), ("p2-d", "p2-b")]
    assert len(by_annotator["ann@example.org"]) == 6
    assert by_annotator["8"] == [("p1-c", "p1-a")]
    assert "9" not in by_annotator  # cancelled
    assert "format auto -> label-studio" in result.stderr
    # 7 and the e-mail each rank p1: couples (a,b) (a,d) (b,c) (b,d) (c,d) have one comparison each,
    # 4 agree (not (a,b)); (a,c) was also judged by 8, against both: 3 comparisons, 1 agrees -> 5 / 8
    assert json.loads(result.stdout)["agreement"]["pairwise"] == pytest.approx(5 / 8)


def test_argilla_exports(cli, tmp_path, samples_file):
    fields = {
        "prompt": "Question p1?",
        "response_1": "Answer a of p1.",
        "response_2": "Answer b of p1.",
        "response_3": "Answer c of p1.",
    }
    v2 = {"id": "r1", "fields": fields, "metadata": {"prompt_id": "p1"}, "responses": {"ranking": [
        {"value": ["response_3", "response_1", "response_2"], "user_id": "u1", "status": "submitted"},
        {"value": ["response_1", "response_3", "response_2"], "user_id": "u2", "status": "draft"},
    ]}}  # fmt: skip
    v1 = {"fields": fields, "responses": [{"user_id": "u2", "status": "submitted", "values": {"rank": {"value": [
        {"value": "response_2", "rank": 1}, {"value": "response_1", "rank": 2}, {"value": "response_3", "rank": 2},
    ]}}}]}  # fmt: skip
    flat = {
        "prompt": "Question p2?",
        "ranking.responses": [["p2-a", "p2-b"]],
        "ranking.responses.users": ["u3"],
        "ranking.responses.status": ["submitted"],
    }
    result, pairs = _import(cli, tmp_path, samples_file, [v2, v1, flat], "--tie-pairs")
    assert [(p["annotator"], p["chosen_id"], p["rejected_id"], p.get("margin")) for p in pairs] == [
        ("u1", "p1-c", "p1-a", None), ("u1", "p1-c", "p1-b", None), ("u1", "p1-a", "p1-b", None),
        ("u2", "p1-b", "p1-a", None), ("u2", "p1-b", "p1-c", None), ("u2", "p1-a", "p1-c", 0.0),
        ("u3", "p2-a", "p2-b", None),
    ]  # fmt: skip
    assert "format auto -> argilla" in result.stderr


def test_csv_with_header(cli, tmp_path, samples_file):
    text = 'prompt_id,annotator,ranking\np1,x,p1-d > p1-a = p1-b > p1-c\np2,x,"p2-a, p2-b"\n'
    result, pairs = _import(cli, tmp_path, samples_file, text, name="rankings.csv")
    assert _ids(pairs) == [
        ("p1-d", "p1-a"),
        ("p1-d", "p1-b"),
        ("p1-d", "p1-c"),
        ("p1-a", "p1-c"),
        ("p1-b", "p1-c"),
        ("p2-a", "p2-b"),
    ]
    assert "format auto -> csv (native rows)" in result.stderr and json.loads(result.stdout)["format"] == "csv"
    # long form: one row per completion score
    text = "prompt_id,completion_id,score\np1,p1-a,1\np1,p1-b,3\np2,p2-c,2\np2,p2-d,5\n"
    _, pairs = _import(cli, tmp_path, samples_file, text, "--score-margin", name="scores.csv")
    assert [(*pair, p["margin"]) for pair, p in zip(_ids(pairs), pairs)] == [("p1-b", "p1-a", 2.0), ("p2-d", "p2-c", 3.0)]
    # best-of-K and pairwise rows
    _, pairs = _import(cli, tmp_path, samples_file, "prompt_id,best\np1,p1-b\n", name="best.csv")
    assert _ids(pairs) == [("p1-b", "p1-a"), ("p1-b", "p1-c"), ("p1-b", "p1-d")]
    _, pairs = _import(
        cli, tmp_path, samples_file, "prompt,chosen,rejected\nQuestion p2?,Answer a of p2.,Answer b of p2.\n", name="pw.csv"
    )
    assert _ids(pairs) == [("p2-a", "p2-b")]


def test_format_detection_and_ranking_strings():
    assert detect_format({"prompt_id": "p", "ranking": []}) == "native"
    assert detect_format({"prompt_id": "p", "scores": {}}) == "scores"
    assert detect_format({"prompt_id": "p", "best": 0}) == "best-of-k"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "pairwise"
    assert detect_format({"data": {}, "annotations": []}) == "label-studio"
    assert detect_format({"fields": {}, "responses": {}}) == "argilla"
    assert detect_format({"x.responses": []}) == "argilla"
    assert detect_format({"text": "hi"}) is None
    assert parse_ranking_string("a > b = c > d", "ranking") == ["a", ["b", "c"], "d"]
    assert parse_ranking_string('["a", ["b", "c"]]', "ranking") == ["a", ["b", "c"]]


def test_named_format_and_stdin(cli, tmp_path, samples_file):
    line = json.dumps({"prompt_id": "p2", "ranking": ["p2-b", "p2-a"]}) + "\n"
    out = tmp_path / "pairs.jsonl"
    result = cli("rank-import", "-", "--samples", samples_file, "--out", out, "--format", "native", input=line)
    assert result.exit_code == 0, result.stderr
    assert "format auto" not in result.stderr
    assert [json.loads(x)["chosen_id"] for x in out.read_text().splitlines()] == ["p2-b"]


# --- validation ---------------------------------------------------------------------------------

GOOD = {"prompt_id": "p1", "ranking": ["p1-a", "p1-b"], "annotator": "x"}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"prompt_id": "p1", "ranking": ["p1-a", "p1-zz"]}, ":2: field 'ranking.1': unknown completion id 'p1-zz'"),
        ({"prompt_id": "p1", "ranking": ["p1-a", ["p1-b", "p1-a"]]}, ":2: field 'ranking.1.1': completion 'p1-a' ranked twice"),
        (
            {"prompt_id": "p1", "ranking": ["p1-a", "p2-b"]},
            ":2: field 'ranking.1': completion 'p2-b' belongs to prompt 'p2', not 'p1'",
        ),
        ({"prompt_id": "p1", "ranking": ["p1-a"]}, ":2: field 'ranking': fewer than 2 completions ranked (1)"),
        (
            {"prompt_id": "p9", "ranking": ["p1-a", "p1-b"]},
            ":2: field 'prompt_id': unknown prompt 'p9' (not in the samples file)",
        ),
        (
            {"prompt_id": "p1", "ranking": ["p1-c", "p1-d"], "annotator": "x"},
            ":2: field 'annotator': prompt 'p1' was already ranked by annotator 'x' at line 1",
        ),
        ({"prompt_id": "p1", "ranking": [["p1-a", "p1-b"], []]}, ":2: field 'ranking.1': an empty tie group"),
        ({"prompt_id": "p1", "ranking": "p1-a"}, ":2: field 'ranking': fewer than 2"),
        ({"prompt_id": "p1", "ranking": 5}, ":2: field 'ranking': expected a list or a string, got int 5"),
    ],
    ids=[
        "unknown-id",
        "ranked-twice",
        "other-prompt",
        "fewer-than-2",
        "unknown-prompt",
        "same-annotator-twice",
        "empty-tie",
        "one-id",
        "wrong-type",
    ],
)
def test_each_invalid_ranking_is_one_line_and_writes_nothing(cli, tmp_path, samples_file, bad, expected):
    result, _ = _import(
        cli, tmp_path, samples_file, [GOOD, bad], "--val-fraction", "0.5", "--stats", tmp_path / "s.json", expect_ok=False
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'rankings.jsonl'}:") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rankings.jsonl", "samples.jsonl"]  # no output, no temp file


def test_text_index_and_format_errors(cli, tmp_path, samples_file):
    result, _ = _import(cli, tmp_path, samples_file, [{"prompt_id": "p1", "best": 4}], expect_ok=False)
    assert (
        result.exit_code == 1
        and ":1: field 'best': index 4 out of range: prompt 'p1' has 4 completions (0-based)" in result.stderr
    )
    result, _ = _import(
        cli,
        tmp_path,
        samples_file,
        [{"prompt": "Question p1?", "chosen": "Answer a of p1.", "rejected": "Not there."}],
        expect_ok=False,
    )
    assert result.exit_code == 1 and ":1: field 'rejected': matches no completion of prompt 'p1'" in result.stderr
    result, _ = _import(cli, tmp_path, samples_file, [{"text": "hello"}], expect_ok=False)
    assert (
        result.exit_code == 1
        and ":1: cannot tell the rankings format from the keys (text); name it with --format" in result.stderr
    )
    bad_samples = tmp_path / "bad.jsonl"
    bad_samples.write_text(json.dumps(_samples()[0]) + "\n" + json.dumps(_samples()[0]) + "\n")
    result = cli("rank-import", _write(tmp_path / "r.jsonl", [GOOD]), "--samples", bad_samples, "--out", tmp_path / "o.jsonl")
    assert (
        result.exit_code == 1 and f"{bad_samples}:2: field 'prompt_id': duplicate prompt id 'p1' (also line 1)" in result.stderr
    )


def test_skip_invalid_counts(cli, tmp_path, samples_file):
    records = [GOOD, {"prompt_id": "p9", "ranking": ["p1-a", "p1-b"]}, {"prompt_id": "p2", "ranking": ["p2-a", "p2-a"]}]
    result, pairs = _import(cli, tmp_path, samples_file, records, "--skip-invalid")
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 2 and summary["records"] == 3 and _ids(pairs) == [("p1-a", "p1-b")]


# --- annotators, policies, split, outputs -------------------------------------------------------

TWO_ANNOTATORS = [
    {"prompt_id": "p1", "ranking": ["p1-a", "p1-b", "p1-c", "p1-d"], "annotator": "x"},
    {"prompt_id": "p1", "ranking": ["p1-a", ["p1-b", "p1-c"], "p1-d"], "annotator": "y"},
    {"prompt_id": "p1", "ranking": ["p1-a", "p1-c", "p1-b", "p1-d"], "annotator": "z"},
]


def test_annotators_keep_all_pairs_or_vote(cli, tmp_path, samples_file):
    stats_file = tmp_path / "stats.json"
    _, pairs = _import(cli, tmp_path, samples_file, TWO_ANNOTATORS, "--stats", stats_file)
    assert len(pairs) == 6 + 5 + 6 and {p["group"] for p in pairs} == {"p1/x", "p1/y", "p1/z"}
    # couples (a,b) (a,c) (a,d) (b,d) (c,d): all three agree (3 annotator pairs each = 15 agreements);
    # (b,c): x says b, y tie, z says c -> 0 of 3 agree; 15 / 18
    stats = json.loads(stats_file.read_text())
    assert stats["agreement"]["pairwise"] == pytest.approx(15 / 18, abs=1e-4)
    assert stats["agreement"]["comparisons"] == 18
    assert stats["agreement"]["per_annotator"]["y"]["pairwise"] == pytest.approx(10 / 12, abs=1e-4)
    assert stats["agreement"]["per_prompt"]["p1"]["comparisons"] == 18
    assert -1 <= stats["agreement"]["alpha"] <= 1
    # majority: (b, c) is 1 vote against 1 (the tie abstains) -> a tie, written only with --tie-pairs
    _, pairs = _import(cli, tmp_path, samples_file, TWO_ANNOTATORS, "--aggregate", "majority")
    assert sorted(_ids(pairs)) == [("p1-a", "p1-b"), ("p1-a", "p1-c"), ("p1-a", "p1-d"), ("p1-b", "p1-d"), ("p1-c", "p1-d")]
    assert {p["group"] for p in pairs} == {"p1/majority"} and {p["annotator"] for p in pairs} == {"majority"}
    _, pairs = _import(
        cli, tmp_path, samples_file, TWO_ANNOTATORS[:2] + [{**TWO_ANNOTATORS[0], "annotator": "w"}], "--aggregate", "majority"
    )
    assert ("p1-b", "p1-c") in _ids(pairs)  # x and w say b > c, y ties: b wins 2 to 0


def test_policies_get_elo_and_win_rates(cli, tmp_path, samples_file):
    # sft completions (a, b) always beat ppo completions (c, d)
    rankings = [{"prompt_id": p, "ranking": [f"{p}-a", f"{p}-b", f"{p}-c", f"{p}-d"]} for p in ("p1", "p2")]
    stats_file = tmp_path / "stats.json"
    result, _ = _import(cli, tmp_path, samples_file, rankings, "--stats", stats_file)
    policies = json.loads(stats_file.read_text())["policies"]
    # 8 sft-vs-ppo games, all won by sft
    assert policies["win_rate"]["sft"]["ppo"] == {"win_rate": 1.0, "games": 8.0}
    elo = policies["elo"]
    assert (
        elo["sft"]["rating"] > 1000 > elo["ppo"]["rating"]
        and elo["sft"]["ci_low"] <= elo["sft"]["rating"] <= elo["sft"]["ci_high"]
    )
    assert set(json.loads(result.stdout)["elo"]) == {"sft", "ppo"}
    assert "Elo" in result.stderr and "win rate" in result.stderr
    # one policy: no Elo
    _, _ = _import(cli, tmp_path, samples_file, [{"prompt_id": "p1", "ranking": ["p1-a", "p1-b"]}], "--stats", stats_file)
    assert json.loads(stats_file.read_text())["policies"] is None


def test_split_by_prompt(cli, tmp_path, samples_file):
    assert val_out_path("out/pairs.jsonl") == "out/pairs.val.jsonl"
    assert val_out_path("pairs.jsonl.gz") == "pairs.val.jsonl.gz"
    assert val_out_path("pairs") == "pairs.val"
    # the hash split is deterministic and depends on the prompt only
    assert [is_validation(f"q{i}", 0.5) for i in range(8)] == [is_validation(f"q{i}", 0.5) for i in range(8)]
    assert 2 <= sum(is_validation(f"q{i}", 0.5) for i in range(40)) <= 38
    rankings = [{"prompt_id": p, "ranking": [f"{p}-a", f"{p}-b"], "annotator": a} for p in ("p1", "p2") for a in ("x", "y")]
    result, train = _import(cli, tmp_path, samples_file, rankings, "--val-fraction", "0.5", "--seed", "3")
    val = [json.loads(line) for line in (tmp_path / "pairs.val.jsonl").read_text().splitlines()]
    summary = json.loads(result.stdout)
    assert summary["val_out"] == str(tmp_path / "pairs.val.jsonl")
    assert len(train) + len(val) == 4 and summary["train_pairs"] == len(train)
    assert not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in val}
    assert {p["prompt_id"] for p in val} == {p for p in ("p1", "p2") if is_validation(p, 0.5, 3)}


def test_out_dash_streams_pairs_and_reports_on_stderr(cli, tmp_path, samples_file):
    rankings = _write(tmp_path / "r.jsonl", [GOOD])
    result = cli("rank-import", rankings, "--samples", samples_file, "--out", "-")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["chosen_id"] for line in result.stdout.splitlines()] == ["p1-a"]
    assert '"pairs": 1' in result.stderr
    result = cli("rank-import", rankings, "--samples", samples_file, "--out", "-", "--val-fraction", "0.2")
    assert result.exit_code == 1 and "give --val-out FILE" in result.stderr


def test_finish_reasons_travel_to_the_comparisons_and_the_reward_model_sees_them(tmp_path, tokenizer):
    """A cut-off completion (finish_reason "length") is scored without the EOS, in train-rm as in ppo:
    rank-import copies each completion's finish_reason into the comparison."""
    from rlhfkit import rm_data
    from rlhfkit.data import records
    from rlhfkit.rankings import SampleIndex
    from rlhfkit.stages.rank_import import Pair, comparison_record

    sample = records.parse_samples({"prompt_id": "p", "prompt": "Say hi.", "completions": [
        {"id": "a", "text": "hi there", "finish_reason": "stop"},
        {"id": "b", "text": "hello hello hello", "finish_reason": "length"}]})  # fmt: skip
    record = comparison_record(Pair("p", "a", "b", "p/x", None, None), SampleIndex([sample]))
    assert record["chosen_finish_reason"] == "stop" and record["rejected_finish_reason"] == "length"
    comparison = records.parse_comparison(record)
    (element,), _ = rm_data.build_elements([comparison], rm_data.Encoder(tokenizer), 1024)
    chosen, rejected = element.sequences[element.winners[0]], element.sequences[element.losers[0]]
    assert chosen[-1] == tokenizer.eos_token_id and rejected[-1] != tokenizer.eos_token_id
    with pytest.raises(records.RecordError, match="expected 'stop' or 'length'"):
        records.parse_comparison({**record, "chosen_finish_reason": "eos"})
