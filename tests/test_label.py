"""rlhfkit label without a server: tasks, assignment and blind order, the rankings file (torn
lines, undo), submissions -> records -> rank-import pairs in every mode, the guidelines renderer,
the CLI's refusals, and the Label Studio / Argilla round trips through exports written by hand in
each tool's documented format."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from itertools import combinations

import pytest

from rlhfkit.data.records import parse_samples
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.label.export import argilla_records, argilla_settings, label_studio_config, label_studio_tasks
from rlhfkit.label.guidelines import render_markdown
from rlhfkit.label.labeler import Labeler, RequestError
from rlhfkit.label.store import RankingsStore
from rlhfkit.label.tasks import Assignment, blind_order, build_tasks

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _samples(k: int = 4, prompts: tuple[str, ...] = ("p1", "p2"), chat_k: int = 2) -> list[dict]:
    """Plain prompts with k completions each (the first half from 'sft', the rest from 'ppo'),
    then p3: a chat prompt with chat_k completions (none if 0)."""
    out = []
    for pid in prompts:
        completions = [
            {"id": f"{pid}-{c}", "text": f"Answer {c} of {pid}.", "policy": "sft" if i < k // 2 else "ppo"}
            for i, c in enumerate("abcdefgh"[:k])
        ]
        out.append({"prompt_id": pid, "prompt": f"Question {pid}?", "completions": completions})
    if chat_k:
        out.append({"prompt_id": "p3", "prompt": CHAT, "completions": [{"id": f"p3-{c}", "text": f"{c.upper()}."} for c in "ab"]})
    return out


def _write(path, records) -> str:
    text = json.dumps(records, indent=2) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    return str(path)


@pytest.fixture()
def samples_file(tmp_path):
    return _write(tmp_path / "samples.jsonl", _samples())


def _pairs(cli, tmp_path, samples, rankings, *args) -> tuple[dict, set[tuple[str, str, str]], int]:
    """rank-import's summary, its pairs as {(annotator, chosen, rejected)}, and how many there were."""
    out = tmp_path / "pairs.jsonl"
    result = cli("rank-import", rankings, "--samples", samples, "--out", out, "--bootstrap", "20", *args)
    assert result.exit_code == 0, result.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    return json.loads(result.stdout), {(p.get("annotator"), p["chosen_id"], p["rejected_id"]) for p in pairs}, len(pairs)


def _ranking_pairs(annotator: str, tiers: list[list[str]]) -> set[tuple[str, str, str]]:
    """Every (annotator, better, worse) of a ranking given as tiers, best first; ties give none."""
    return {(annotator, a, b) for i, j in combinations(range(len(tiers)), 2) for a in tiers[i] for b in tiers[j]}


# --- tasks: assignment, blind order, k-max ------------------------------------------------------


def test_overlap_assignment_is_the_worked_example():
    assignment = Assignment(["a", "b", "c"], 2, 4)
    judged = [{name for name in "abc" if assignment.judges(name, i)} for i in range(4)]
    assert judged == [{"a", "b"}, {"c", "a"}, {"b", "c"}, {"a", "b"}]  # every prompt judged exactly twice
    assert sorted(len(p) for p in assignment.prompts.values()) == [2, 3, 3]  # floor/ceil of 4*2/3
    assert Assignment(["a", "b"], 2, 3).overlap == 0  # overlap = number of names: everyone judges everything
    anyone = Assignment([], 0, 3)
    assert anyone.accepts("x.y@z") and not anyone.accepts("no spaces") and not anyone.accepts("")


@pytest.mark.parametrize(
    "names, overlap, expected",
    [
        ([], 1, "--overlap 1 needs the annotators' names"),
        (["a", "b"], 3, "--overlap 3: only 2 annotator(s) named"),
        (["a", "a"], 0, "--annotator 'a' given twice"),
        (["a b"], 0, "--annotator 'a b': a name is 1-64 letters"),
        (["a"], -1, "--overlap -1"),
    ],
)
def test_assignment_refuses_bad_options(names, overlap, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Assignment(names, overlap, 4)


def test_blind_order_is_per_annotator_and_stable():
    samples = [parse_samples(s) for s in _samples(k=6)]
    tasks, too_few = build_tasks(samples, "rank")
    assert too_few == 0 and [t.prompt_id for t in tasks] == ["p1", "p2", "p3"]
    orders = {name: [blind_order(0, name, t) for t in tasks] for name in ("alice", "bob")}
    for name, per_task in orders.items():
        assert per_task == [blind_order(0, name, t) for t in tasks]  # the same after a restart
        assert all(sorted(o) == sorted(t.completion_ids) for o, t in zip(per_task, tasks))
    assert orders["alice"][:2] != orders["bob"][:2]  # 6! orders each: the two annotators see different ones
    assert [blind_order(1, "alice", t) for t in tasks[:2]] != orders["alice"][:2]  # the seed changes them too


def test_label_seeds_keep_the_values_recorded_logs_rely_on():
    """The blind order is recomputed from (seed, annotator, prompt, ids) to read a judgement log back,
    so the label scheme of `seeds.row_seed` stays the first 8 bytes of sha256 of the parts joined by NUL."""
    import hashlib

    from rlhfkit.seeds import row_seed

    parts = (0, "order", "alice", "p1", "c1", "c2")
    expected = int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")
    assert row_seed(*parts, scheme="hex64") == expected


def test_k_max_shows_everyone_the_same_subset_and_pairwise_every_couple():
    samples = [parse_samples(s) for s in _samples(k=6)]
    tasks, _ = build_tasks(samples, "rank", k_max=3, seed=5)
    assert [len(t.completion_ids) for t in tasks] == [3, 3, 2]
    assert tasks[0].completion_ids == build_tasks(samples, "rank", k_max=3, seed=5)[0][0].completion_ids
    pairwise, _ = build_tasks(samples, "pairwise", k_max=3, seed=5)
    assert len(pairwise) == 3 + 3 + 1 and {t.completion_ids for t in pairwise[:3]} == set(
        combinations(tasks[0].completion_ids, 2)
    )
    with pytest.raises(ConfigError, match="best-of-K judgement ranks the best above every completion"):
        build_tasks(samples, "best-of-k", k_max=3)


# --- the rankings file ----------------------------------------------------------------------------


def test_store_cuts_a_torn_last_line_and_keeps_a_whole_one(tmp_path):
    path = tmp_path / "r.jsonl"
    good = '{"prompt_id": "p1", "ranking": ["p1-a", "p1-b"], "annotator": "x"}\n'
    path.write_text(good + '{"prompt_id": "p2", "rank')  # a crash mid-line
    store = RankingsStore(path)
    assert store.torn_bytes == len('{"prompt_id": "p2", "rank') and len(store.records) == 1
    assert path.read_text() == good
    store.append({"prompt_id": "p2", "ranking": ["p2-a", "p2-b"], "annotator": "x"})
    assert [json.loads(line)["prompt_id"] for line in path.read_text().splitlines()] == ["p1", "p2"]

    path.write_text(good.rstrip("\n"))  # written by hand without a final newline: a whole record, kept
    store = RankingsStore(path)
    assert store.torn_bytes == 0 and len(store.records) == 1 and path.read_text() == good

    path.write_text(good + "{oops\n" + good)
    with pytest.raises(DataError, match=r"r.jsonl:2: invalid JSON"):
        RankingsStore(path)


def test_store_remove_rewrites_atomically_keeping_other_lines_byte_for_byte(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = ['{"a":1,  "annotator": "x"}\n', '{"b": 2, "annotator": "y"}\n', '{"c":  3, "annotator": "x"}\n']
    path.write_text("".join(lines))
    os.chmod(path, 0o640)
    store = RankingsStore(path)
    assert store.remove(1) == {"b": 2, "annotator": "y"}
    assert path.read_text() == lines[0] + lines[2]  # spacing of untouched lines kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
    assert RankingsStore(path).records == store.records


# --- submissions -> records -> rank-import ---------------------------------------------------------


def _labeler(tmp_path, mode: str = "rank", samples: list[dict] | None = None, **kwargs) -> Labeler:
    parsed = [parse_samples(s) for s in (samples or _samples())]
    return Labeler(parsed, RankingsStore(tmp_path / "rankings.jsonl"), mode=mode, **kwargs)


def _submit(labeler: Labeler, annotator: str, index: int, **judgement) -> dict:
    labeler.view(annotator, labeler.tasks[index])
    record = labeler.prepare({"annotator": annotator, "index": index, "prompt_id": labeler.tasks[index].prompt_id, **judgement})
    labeler.store.append(record)
    labeler.committed(record)
    return record


def test_rank_submission_is_the_worked_example(tmp_path):
    """Wanted: c0 best, c2 and c3 tied, c1 last, whatever order the annotator was shown."""
    labeler = _labeler(tmp_path)
    order = blind_order(0, "alice", labeler.tasks[0])
    wanted = {"p1-a": 1, "p1-c": 2, "p1-d": 2, "p1-b": 3}
    record = _submit(labeler, "alice", 0, ranks=[wanted[cid] for cid in order], comment="close call")
    tie = [cid for cid in order if wanted[cid] == 2]
    assert record["ranking"] == ["p1-a", tie, "p1-b"] and record["shown"] == order
    assert record["annotator"] == "alice" and record["comment"] == "close call" and record["timestamp"].endswith("Z")
    assert 0 <= record["seconds"] < 60
    assert labeler.progress("alice") == {"done": 1, "total": 3} and labeler.next_task("alice") is labeler.tasks[1]
    # the page gets the undone judgement back by positions
    assert labeler.previous(record, labeler.tasks[0]) == {"comment": "close call", "ranks": [wanted[cid] for cid in order]}


def test_every_mode_round_trips_through_rank_import(cli, tmp_path, samples_file):
    for mode in ("rank", "best-of-k", "scores", "pairwise"):
        (tmp_path / mode).mkdir()
        labeler = _labeler(tmp_path / mode, mode)
        order = blind_order(0, "ann", labeler.tasks[0])
        if mode == "rank":
            _submit(labeler, "ann", 0, ranks=[1, 2, 2, 3])
            want = _ranking_pairs("ann", [[order[0]], order[1:3], [order[3]]])
        elif mode == "best-of-k":
            _submit(labeler, "ann", 0, best=2)
            want = {("ann", order[2], other) for other in order if other != order[2]}
        elif mode == "scores":
            _submit(labeler, "ann", 0, scores=[7, 2, 5, 5])
            want = _ranking_pairs("ann", [[order[0]], order[2:4], [order[1]]])
        else:
            assert len(labeler.tasks) == 6 + 6 + 1  # every couple of p1, p2, and p3's one
            _submit(labeler, "ann", 0, best=1)
            want = {("ann", order[1], order[0])}
        _submit(labeler, "ann", len(labeler.tasks) - 1, flag="Both answers are in a language I do not read")
        summary, pairs, count = _pairs(cli, tmp_path, samples_file, labeler.store.path)
        assert pairs == want and count == len(want), mode
        assert summary["records"] == 2 and summary["judgements"] == 1, mode


def test_abstention_first_still_detects_the_format(cli, tmp_path, samples_file):
    rankings = _write(
        tmp_path / "r.jsonl",
        [
            {"prompt_id": "p2", "ranking": [], "flag": "unreadable", "annotator": "x"},
            {"prompt_id": "p1", "best": "p1-c", "annotator": "x"},
        ],
    )
    result = cli(
        "rank-import", rankings, "--samples", samples_file, "--out", tmp_path / "o.jsonl", "--stats", tmp_path / "s.json"
    )
    assert result.exit_code == 0, result.stderr
    assert "format auto -> best-of-k" in result.stderr and "abstentions (can't judge)" in result.stderr
    assert json.loads((tmp_path / "s.json").read_text())["abstained"] == 1 and json.loads(result.stdout)["pairs"] == 3


def test_submissions_are_checked(tmp_path):
    labeler = _labeler(tmp_path, annotators=["alice", "bob"], overlap=1)
    task = labeler.tasks[0]  # prompt 0 goes to alice only
    base = {"annotator": "alice", "index": 0, "prompt_id": task.prompt_id}
    cases = [
        ({**base, "annotator": "carol"}, 403, "not one of this session's annotators"),
        ({**base, "annotator": "bob"}, 403, "not assigned to 'bob'"),
        ({**base, "index": 99}, 404, "no task 99"),
        ({**base, "index": True}, 400, "index"),
        ({**base, "prompt_id": "p2"}, 409, "out of date"),
        ({**base, "ranks": [1, 2, 3]}, 400, "expected 4 integers from 1 to 4"),
        ({**base, "ranks": [1, 2, 3, 5]}, 400, "expected 4 integers"),
        ({**base, "ranks": [1, 2, 3, True]}, 400, "expected 4 integers"),
        ({**base, "ranks": [1, 2, 3, 4], "flag": "x"}, 400, "not both"),
        ({**base, "flag": "   "}, 400, "flag"),
        ({**base, "ranks": [1, 2, 3, 4], "comment": 5}, 400, "comment"),
    ]
    for body, status, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            labeler.prepare(body)
        assert e.value.status == status, body
    _submit(labeler, "alice", 0, ranks=[1, 2, 3, 4])
    with pytest.raises(RequestError, match="already judged") as e:
        labeler.prepare({**base, "ranks": [1, 2, 3, 4]})
    assert e.value.status == 409
    assert labeler.progress("alice") == {"done": 1, "total": 2} and labeler.progress("bob") == {"done": 0, "total": 1}


def test_resume_refuses_another_mode_or_a_foreign_file(tmp_path):
    labeler = _labeler(tmp_path, "best-of-k")
    _submit(labeler, "x", 0, best=0)
    with pytest.raises(ConfigError, match=r"rankings.jsonl:1: a best-of-k judgement, but this is --mode rank"):
        _labeler(tmp_path, "rank")
    resumed = _labeler(tmp_path, "best-of-k")
    assert resumed.progress("x") == {"done": 1, "total": 3} and resumed.next_task("x") is resumed.tasks[1]
    (tmp_path / "rankings.jsonl").write_text('{"prompt_id": "p1", "ranking": ["p1-a", "p1-b"]}\n')
    with pytest.raises(DataError, match="field 'annotator': missing: not a file written by 'rlhfkit label'"):
        _labeler(tmp_path, "rank")


# --- guidelines ----------------------------------------------------------------------------------------


def test_guidelines_render_markdown_and_escape_everything_else():
    out = render_markdown("## Be *kind*\n\n1. **helpful** first\n2. then `safe`\n\n<script>alert(1)</script> [x](javascript:y)")
    assert out == (
        "<h4>Be <em>kind</em></h4>\n<ol><li><strong>helpful</strong> first</li><li>then <code>safe</code></li></ol>\n"
        "<p>&lt;script&gt;alert(1)&lt;/script&gt; x (javascript:y)</p>"
    )


# --- the CLI's refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: give --token SECRET"),
        (["--out", "-"], "--out: a file name is needed"),
        (["--overlap", "2"], "--overlap 2 needs the annotators' names"),
        (["--mode", "best-of-k", "--k-max", "2"], "--k-max 2 with --mode best-of-k"),
        (["--k-max", "1"], "--k-max: must be 0 (all completions) or at least 2"),
        (["--export", "argilla", "--mode", "pairwise"], "--export argilla writes a ranking question"),
        (["--export", "label-studio", "--mode", "scores"], "--export label-studio writes a Ranker"),
        (["--guidelines", "missing.md"], "missing.md: cannot read the guidelines"),
        (["--export", "label-studio", "--guidelines", "g.md"], "Label Studio keeps instructions in the project's settings"),
    ],
)
def test_cli_refuses_bad_options_with_one_line(cli, tmp_path, samples_file, args, expected):
    out = tmp_path / "out" / "rankings.jsonl"
    result = cli("label", samples_file, "--out", out, *args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert not out.parent.exists()  # nothing written, nothing served


# --- exports: Label Studio -----------------------------------------------------------------------------


def _export(cli, tmp_path, samples_file, tool, *args) -> tuple[list[dict], str]:
    out = tmp_path / f"{tool}.json"
    result = cli("label", samples_file, "--export", tool, "--out", out, *args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    return json.loads(out.read_text()), summary.get("label_config") or summary["settings"]


def test_label_studio_ranker_round_trip_json_and_json_min(cli, tmp_path, samples_file):
    tasks, config_path = _export(cli, tmp_path, samples_file, "label-studio")
    config = ET.parse(config_path).getroot()  # well-formed XML
    assert config.find("List").get("value") == "$items" and config.find("Ranker").attrib == {
        "name": "rank",
        "toName": "responses",
    }
    assert [t["data"]["prompt_id"] for t in tasks] == ["p1", "p2", "p3"]
    assert all("policy" not in json.dumps(t) and "sft" not in json.dumps(t) for t in tasks)  # blind
    assert tasks[2]["data"]["messages"] == CHAT

    # what Label Studio's JSON export holds once people ranked (documented: value.ranker = {Ranker name: ids in order})
    def ranker(ids):
        return {"id": "PpwBv_NMxd", "from_name": "rank", "to_name": "responses", "type": "ranker", "origin": "manual",
                "value": {"ranker": {"rank": ids}}}  # fmt: skip

    orders = {t["data"]["prompt_id"]: [item["id"] for item in t["data"]["items"]] for t in tasks}
    by_7 = {pid: list(reversed(ids)) for pid, ids in orders.items()}
    export = [
        {
            "id": i + 1,
            "data": task["data"],
            "annotations": [
                {
                    "id": 10 + i,
                    "completed_by": 7,
                    "result": [ranker(by_7[task["data"]["prompt_id"]])],
                    "was_cancelled": False,
                    "lead_time": 12.5,
                    "created_at": "2025-01-01T10:00:00Z",
                },
                {
                    "id": 20 + i,
                    "completed_by": {"id": 8, "email": "ann@example.org"},
                    "result": [ranker(orders[task["data"]["prompt_id"]])],
                },
                {"id": 30 + i, "completed_by": 9, "was_cancelled": True, "result": []},
            ],
        }  # fmt: skip
        for i, task in enumerate(tasks)
    ]
    expected = set()
    for pid in orders:
        expected |= _ranking_pairs("7", [[c] for c in by_7[pid]]) | _ranking_pairs("ann@example.org", [[c] for c in orders[pid]])
    summary, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "ls_export.json", export))
    assert pairs == expected and count == len(expected) == 2 * (6 + 6 + 1)
    assert summary["agreement"]["pairwise"] == 0.0  # one reversed the other on every couple

    # JSON-MIN: one flat record per annotation: data fields, task id, results under the control's name, annotator
    json_min = [
        {**task["data"], "id": i + 1, "rank": [{"ranker": {"rank": by_7[task["data"]["prompt_id"]]}}], "annotator": 7,
         "annotation_id": 10 + i, "created_at": "2025-01-01T10:00:00Z", "updated_at": "2025-01-01T10:00:00Z", "lead_time": 12.5}
        for i, task in enumerate(tasks)
    ]  # fmt: skip
    summary, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "ls_min.json", json_min))
    assert summary["format"] == "label-studio" and pairs == {p for p in expected if p[0] == "7"} and count == 13


def test_label_studio_pairwise_round_trip_json_and_json_min(cli, tmp_path, samples_file):
    tasks, config_path = _export(cli, tmp_path, samples_file, "label-studio", "--mode", "pairwise")
    config = ET.parse(config_path).getroot()
    assert config.find("Pairwise").attrib == {"name": "comparison", "toName": "response_a,response_b"}
    assert len(tasks) == 6 + 6 + 1
    for t in tasks:  # the Texts show the two responses; items name their ids, left first
        assert [t["data"]["response_a"], t["data"]["response_b"]] == [item["body"] for item in t["data"]["items"]]
    chosen = {i: "left" if i % 2 else "right" for i in range(len(tasks))}
    expected = set()
    for i, t in enumerate(tasks):
        left, right = (item["id"] for item in t["data"]["items"])
        expected.add(("u1", left, right) if chosen[i] == "left" else ("u1", right, left))
    export = [
        {"id": i, "data": t["data"], "annotations": [{"completed_by": {"email": "u1"}, "result": [
            {"from_name": "comparison", "to_name": "response_a,response_b", "type": "pairwise",
             "value": {"selected": chosen[i]}}]}]}
        for i, t in enumerate(tasks)
    ]  # fmt: skip
    _, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "pw.json", export))
    assert pairs == expected and count == 13
    json_min = [{**t["data"], "id": i, "comparison": [{"selected": chosen[i]}], "annotator": "u1"} for i, t in enumerate(tasks)]
    _, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "pw_min.json", json_min))
    assert pairs == expected and count == 13


# --- exports: Argilla --------------------------------------------------------------------------------


def test_argilla_round_trip_nested_and_flattened_exports(cli, tmp_path):
    samples = _samples(k=3, prompts=("p1", "p2", "p4"), chat_k=0)
    samples[0]["completions"][2]["text"] = samples[0]["completions"][0]["text"]  # two identical answers stay two
    samples_file = _write(tmp_path / "samples.jsonl", samples)
    (tmp_path / "guide.md").write_text("Prefer **short** answers.")
    records, settings_path = _export(cli, tmp_path, samples_file, "argilla", "--guidelines", tmp_path / "guide.md")
    settings = json.loads(open(settings_path).read())
    assert settings["guidelines"] == "Prefer **short** answers."
    assert [f["name"] for f in settings["fields"]] == ["prompt", "response_1", "response_2", "response_3"]
    question = settings["questions"][0]
    assert question["settings"] == {
        "type": "ranking",
        "options": [{"value": f"response_{i}", "text": f"Response {i}"} for i in (1, 2, 3)],
    }
    assert records[0]["metadata"]["prompt_id"] == "p1" and "policy" not in json.dumps(records)

    def ids(record):
        return [record["metadata"][f"response_{i}_id"] for i in (1, 2, 3)]

    # Argilla 2.x `dataset.records.to_json`: the record as exported, responses per question with user and status
    u1 = ["response_3", "response_1", "response_2"]
    nested = [
        {**r, "suggestions": {}, "vectors": {}, "_server_id": f"uuid-{i}", "responses": {"ranking": [
            {"value": u1, "user_id": "u1", "status": "submitted"},
            {"value": list(reversed(u1)), "user_id": "u2", "status": "draft"},  # not submitted: no judgement
        ]}}
        for i, r in enumerate(records)
    ]  # fmt: skip
    expected = set()
    for r in records:
        option_id = dict(zip(["response_1", "response_2", "response_3"], ids(r)))
        expected |= _ranking_pairs("u1", [[option_id[o]] for o in u1])
    expected = {p for p in expected if {p[1], p[2]} != {"p1-a", "p1-c"}}  # identical texts: rank-import drops that pair
    summary, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "argilla.json", nested))
    assert summary["format"] == "argilla" and pairs == expected and count == 8 and summary["identical_dropped"] == 1

    # `to_list(flatten=True)` (what the hub/datasets export holds): fields and metadata at the top level
    flat = [
        {"id": r["id"], "status": "completed", **r["fields"], **r["metadata"], "ranking.responses": [u1],
         "ranking.responses.users": ["u1"], "ranking.responses.status": ["submitted"]}
        for r in records
    ]  # fmt: skip
    _, pairs, count = _pairs(cli, tmp_path, samples_file, _write(tmp_path / "flat.jsonl", flat))
    assert pairs == expected and count == 8


def test_exports_in_the_library_are_blind_and_even(tmp_path):
    samples = [parse_samples(s) for s in _samples(k=4)]
    assert len(label_studio_tasks(samples, "rank")) == 3 and len(label_studio_tasks(samples, "pairwise")) == 13
    with pytest.raises(ConfigError, match="has 2 completions, earlier prompts 4"):
        argilla_records(samples)
    records, k = argilla_records(samples, k_max=2)
    assert k == 2 and len(argilla_settings(k, "")["fields"]) == 3
    assert "<Pairwise" in label_studio_config("pairwise") and "<Ranker" in label_studio_config("rank")
