"""The data files a search scores on, read and checked at config time: each bad file stops with
the YAML key, the file, the line, what is missing and the fix; a held-out set no prediction can
ever match only warns."""

import json

import pytest

from cofitune_plugin.args import RecipeError, SearchConfig
from cofitune_plugin.datafiles import check_data_files, read_rows

QUESTION = {"prompt": "Tom buys 3 apples at 320 dollars each. How much?"}
CHAT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "#### 960"}]


def write_lines(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def config(tmp_path, held_out: list, prompts: list | None = None, **speciality) -> SearchConfig:
    prompts = [{"prompt": "Write a poem"}] if prompts is None else prompts
    return SearchConfig.model_validate(
        {
            "speciality": {"data": write_lines(tmp_path / "held.jsonl", held_out), **speciality},
            "versatility": {"prompts": write_lines(tmp_path / "general.jsonl", prompts)},
        }
    )


def test_bare_numbers_text_worked_solutions_and_chats_pass_without_warnings(tmp_path):
    held_out = [
        {**QUESTION, "answer": "960"},
        {**QUESTION, "answer": "1,200"},
        {**QUESTION, "answer": 12.5},  # a JSON number reads as its text
        {**QUESTION, "answer": "Step 1: 3 * 320 = 960.\n#### 960"},
        "",  # blank lines are skipped
        {"messages": CHAT},
    ]
    prompts = [{"prompt": "Write a poem"}, {"messages": CHAT}]  # an answer in prompts is ignored
    assert check_data_files(config(tmp_path, held_out, prompts), "cofitune.search") == []
    rows = list(read_rows(tmp_path / "held.jsonl"))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 6]
    assert [r.answer for _, r in rows][:3] == ["960", "1,200", "12.5"]
    assert rows[-1][1].messages == CHAT[:1]


@pytest.mark.parametrize(
    ("held_out", "message"),
    [
        (
            [{**QUESTION, "answer": "6"}, QUESTION],
            r"\S*held.jsonl:2: no reference answer, which `metric: exact_match` "
            r"needs; add an `answer` field",
        ),
        (
            [{"messages": CHAT[:1]}],
            r"held.jsonl:1: no reference answer.*or end `messages` with the assistant's answer",
        ),
        (
            [{**QUESTION, "answer": "6"}, '{"prompt": "Q", "answer": 6'],
            r"held.jsonl:2: not JSON \(Expecting ',' delimiter, column 28\); write one JSON object",
        ),
        ([{"question": "Q", "answer": "6"}], r"held.jsonl:1: needs a `messages` or a `prompt`"),
        (['["Q", "6"]'], r"held.jsonl:1: not a JSON object"),
        ([{"messages": "Q"}], r"held.jsonl:1: `messages` must be a non-empty list of"),
        ([{"messages": CHAT[1:]}], r"held.jsonl:1: `messages` holds only an assistant message"),
        ([{"prompt": "Q", "answer": ["6"]}], r"held.jsonl:1: `answer` must be a string"),
        ([""], r"held.jsonl: no rows; write one JSON object per line"),
    ],
)
def test_a_bad_held_out_file_names_the_key_file_line_and_fix(tmp_path, held_out, message):
    with pytest.raises(RecipeError, match=rf"^cofitune\.search\.speciality\.data: .*{message}"):
        check_data_files(config(tmp_path, held_out), "cofitune.search")


def test_every_metric_needs_references_and_only_the_rows_read_are_checked(tmp_path):
    with pytest.raises(
        RecipeError, match=r"held.jsonl:1: no reference answer, which `metric: loss`"
    ):
        check_data_files(config(tmp_path, [QUESTION], metric="loss"), "cofitune.report")
    past_the_limit = [{**QUESTION, "answer": "6"}, "not json"]
    assert check_data_files(config(tmp_path, past_the_limit, limit=1), "k") == []


def test_bad_prompt_files_are_named_by_their_key(tmp_path):
    cfg = config(tmp_path, [{**QUESTION, "answer": "6"}], [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(
        RecipeError, match=r"^k\.versatility\.prompts: \S*general.jsonl:2: `prompt`"
    ):
        check_data_files(cfg, "k")
    cfg.versatility.prompts = str(tmp_path / "missing.jsonl")
    with pytest.raises(RecipeError, match=r"^k\.versatility\.prompts: no file at \S*missing.jsonl"):
        check_data_files(cfg, "k")


def test_references_no_prediction_can_match_warn_and_do_not_stop(tmp_path):
    text_only = [{**QUESTION, "answer": "Paris"}, {**QUESTION, "answer": "Rome"}]
    (warning,) = check_data_files(config(tmp_path, text_only), "cofitune.search")
    assert warning.startswith("cofitune.search.speciality.data: no prediction can ever match")
    assert "(line 1: 'Paris')" in warning and "use `metric: loss`" in warning
    assert check_data_files(config(tmp_path, text_only, metric="loss"), "k") == []
    fitting = config(tmp_path, text_only, answer_regex=r"answer:\s*([a-z]+)")
    assert check_data_files(fitting, "k") == []
    one_number = [*text_only, {**QUESTION, "answer": "960"}]
    assert check_data_files(config(tmp_path, one_number), "k") == []  # odd, but can score
