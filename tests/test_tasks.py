"""Tests for backbones.tasks: catalog, readers on the real data, user tasks, errors, metrics."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from backbones import paths
from backbones.tasks import (
    TASKS, TaskError, TaskFileNotFound, TaskSpec, UnknownTaskError, compute_metric, get_task, load_split,
    load_task_file, metric_name, register_task, task_from_file,
)

DATA = paths.REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data directory not present")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Real-data tests read ../shared/data; user tasks are removed afterwards."""
    monkeypatch.delenv("CEE_DATA_DIR", raising=False)
    before = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(before)


def counts(ds) -> dict[int, int]:
    return dict(Counter(ds["label"]))


@needs_data
@pytest.mark.parametrize("task,split,n,balance", [
    ("RTE", "train", 2490, {0: 1249, 1: 1241}),
    ("RTE", "dev", 277, {0: 146, 1: 131}),
    ("RTE", "test", 3000, {-1: 3000}),
    ("MRPC", "train", 3668, {1: 2474, 0: 1194}),
    ("MRPC", "dev", 408, {1: 279, 0: 129}),
    ("MRPC", "test", 1725, {-1: 1725}),
    ("SST2", "dev", 872, {1: 444, 0: 428}),
    ("SST2", "test", 1821, {-1: 1821}),
    ("QNLI", "dev", 5463, {0: 2702, 1: 2761}),
    ("QNLI", "test", 5463, {-1: 5463}),
    ("MCID", "dev", 176, {i: 11 for i in range(16)}),
    ("StackOverflow", "train", 18000, {i: 900 for i in range(20)}),
    ("StackOverflow", "dev", 1000, {i: 50 for i in range(20)}),
])
def test_real_split_counts(task, split, n, balance):
    ds = load_split(task, split)
    assert len(ds) == n
    assert counts(ds) == balance
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert ds.features["label"].dtype == "int64"
    single = get_task(task).text_b is None
    assert all(b == "" for b in ds["text_b"]) == single


@needs_data
def test_mcid_train_labels_are_sorted_names_of_train_file():
    ds = load_split("MCID", "train")
    assert len(ds) == 1220
    assert len(counts(ds)) == 16 == get_task("MCID").num_labels
    rows = (DATA / "MCID/nid_acl2022/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert get_task("M-CID").label_names == tuple(sorted({r.split("\t")[1] for r in rows}))
    assert not any("\r" in t for t in ds["text_a"])


@needs_data
def test_rte_row_2164_keeps_unbalanced_quote():
    ds = load_split("rte", "train")
    assert ds[2164]["text_a"].startswith('"That film')


@needs_data
def test_mrpc_train_rebuilt_and_keeps_quote_pair():
    ds = load_split("MRPC", "train")
    row = [r for r in ds if r["text_b"].startswith('" extremely heartrending')
           or "Brandeis said this was an \" extremely heartrending" in r["text_a"]]
    assert row and row[0]["label"] == 1
    dev = set(zip(load_split("MRPC", "dev")["text_a"], load_split("MRPC", "dev")["text_b"]))
    assert not dev & set(zip(ds["text_a"], ds["text_b"]))


@needs_data
def test_stackoverflow_quotes_unescaped():
    texts = load_split("StackOverflow", "train")["text_a"]
    assert 'how to replace the "disown" with "screen"?' in texts
    assert texts[416] == '"Information Not Found" page in Visual Studio 2008, VB.NET Express Edition'  # file line 418
    assert not any("\t" in t or '""' in t for t in texts)
    assert get_task("stackoverflow").label_names[19] == "magento"


def test_catalog_and_aliases():
    assert set(TASKS) >= {"RTE", "MRPC", "SST2", "MCID", "StackOverflow", "QNLI"}
    assert get_task("SST-2") is get_task("sst2") is TASKS["SST2"]
    assert get_task("M-CID").name == "MCID"
    assert metric_name("MRPC") == "f1" and metric_name("rte") == "accuracy"
    assert get_task("MRPC").label_names == ("not_paraphrase", "paraphrase")


# --- user tasks and files by path ---------------------------------------------------------

def test_user_task_csv(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text('q,a,y\n"hi, there","x ""y""",b\nfoo,bar,a\n', encoding="utf-8")
    spec = task_from_file("mycsv", f, text_a="q", text_b="a", label="y")
    assert spec.label_names == ("a", "b") and get_task("MyCSV") is spec
    ds = load_split("mycsv", "train")
    assert ds["text_a"] == ["hi, there", "foo"] and ds["text_b"] == ['x "y"', "bar"] and ds["label"] == [1, 0]


def test_user_task_tsv_numeric_labels_and_dev(tmp_path):
    tr, dv = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    tr.write_text("text\tlabel\na\t10\nb\t2\nc\t1\n", encoding="utf-8")
    dv.write_text("text\tlabel\nd\t2\n", encoding="utf-8")
    spec = task_from_file("mytsv", tr, text_a="text", label="label", dev_path=dv)
    assert spec.label_names == ("1", "2", "10")  # numeric sort
    assert load_split("mytsv", "train")["label"] == [2, 1, 0]
    assert load_split("mytsv", "validation")["text_b"] == [""]


def test_user_task_jsonl_with_names_and_int_labels(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"s": s, "l": l}) for s, l in [("good", 1), ("bad", 0)]) + "\n")
    spec = task_from_file("myjson", f, text_a="s", label="l", label_names=["neg", "pos"], metric="f1")
    ds = load_split(spec, "train")
    assert ds["label"] == [1, 0] and ds["text_a"] == ["good", "bad"]


def test_user_task_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        task_from_file("x", tmp_path / "nope.csv", text_a="t", label="l")


def test_builtin_name_cannot_be_replaced():
    with pytest.raises(TaskError, match="built-in"):
        register_task(TaskSpec("rte", ("a", "b"), "accuracy", {}, "t", None, "l", "csv"))


# --- task files (JSON / TOML) ----------------------------------------------------------------

def write_pair_task(folder, **keys):
    """CSV train/dev files in ``folder/data`` and a JSON task file naming them relative to ``folder``."""
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text("premise,hypothesis,gold\na b,c,yes\nd,e f,no\ng,h,yes\n")
    (folder / "data" / "dev.csv").write_text("premise,hypothesis,gold\nx,y,no\n")
    d = {"name": "Pairs", "train": "data/train.csv", "dev": "data/dev.csv", "text_a": "premise",
         "text_b": "hypothesis", "label": "gold", "label_names": ["no", "yes"], "metric": "f1", **keys}
    f = folder / "task.json"
    f.write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return f


def test_task_file_json_registers_the_task(tmp_path):
    spec = load_task_file(write_pair_task(tmp_path))
    assert get_task("pairs") is spec and spec.metric == "f1" and spec.label_names == ("no", "yes")
    assert spec.fmt == "csv" and spec.text_b == "hypothesis"
    ds = load_split("Pairs", "train")
    assert ds["text_a"] == ["a b", "d", "g"] and ds["text_b"] == ["c", "e f", "h"] and ds["label"] == [1, 0, 1]
    assert load_split("Pairs", "dev")["label"] == [0]
    assert spec.partition_texts(ds) is None  # rows held out one by one


def test_task_file_group_by_text_groups_a_pair_by_both_texts(tmp_path):
    spec = load_task_file(write_pair_task(tmp_path, group_by_text=True))
    assert spec.group_by_text
    assert spec.partition_texts(load_split("Pairs", "train")) == ("a b [SEP] c", "d [SEP] e f", "g [SEP] h")


def test_task_file_toml_resolves_paths_against_its_folder(tmp_path, monkeypatch):
    write_pair_task(tmp_path)
    f = tmp_path / "task.toml"
    f.write_text('name = "Single"\ntrain = "data/train.csv"\ntext_a = "premise"\nlabel = "gold"\n'
                 'metric = "accuracy"\nfmt = "csv"\n')
    monkeypatch.chdir(tmp_path / "data")  # relative to the task file, not to the working directory
    spec = load_task_file("../task.toml")
    assert spec.text_b is None and spec.label_names == ("no", "yes") and list(spec.splits) == ["train"]
    assert load_split("Single", "train")["text_b"] == ["", "", ""]


@pytest.mark.parametrize("keys,msg", [
    ({"metric": None}, "missing key 'metric' (accuracy or f1)"),
    ({"name": None}, "missing key 'name'"),
    ({"metric": "auc"}, "key 'metric' must be accuracy or f1; got 'auc'"),
    ({"text_a": 3}, "key 'text_a' must be a non-empty string (the text column); got 3"),
    ({"label_names": ["yes"]}, "key 'label_names' must be a list of two or more label names"),
    ({"fmt": "xml"}, "key 'fmt' must be a file format"),
    ({"txt_a": "premise"}, "unknown key 'txt_a'"),
    ({"label": "answer"}, "no label column 'answer'"),
    ({"dev": "data/missing.csv"}, "Pairs dev file not found"),
    ({"label_names": ["n", "y"]}, "labels ['no', 'yes'] are not in label_names"),
    ({"group_by_text": "yes"}, "key 'group_by_text' must be true or false"),
])
def test_task_file_errors_name_the_file_and_key(tmp_path, keys, msg):
    f = write_pair_task(tmp_path, **keys)
    with pytest.raises(TaskError) as e:
        load_task_file(f)
    assert str(e.value).startswith(f"task file {f}") and msg in str(e.value)
    assert "Pairs" not in TASKS


def test_task_file_missing_bad_extension_and_syntax(tmp_path):
    with pytest.raises(TaskFileNotFound, match="task file not found: .*nope.json"):
        load_task_file(tmp_path / "nope.json")
    (tmp_path / "t.yaml").write_text("name: x\n")
    with pytest.raises(TaskError, match="expected a .json or .toml file"):
        load_task_file(tmp_path / "t.yaml")
    (tmp_path / "t.json").write_text('{"name": "x",\n')
    with pytest.raises(TaskError, match=r"t.json, line 2: invalid JSON"):
        load_task_file(tmp_path / "t.json")
    (tmp_path / "t.toml").write_text("name = \n")
    with pytest.raises(TaskError, match=r"t.toml: invalid TOML"):
        load_task_file(tmp_path / "t.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TaskError, match="expected a table of keys, got list"):
        load_task_file(tmp_path / "list.json")


@needs_data
def test_labelled_test_file_by_path(tmp_path):
    so = tmp_path / "so_test.tsv"
    so.write_text('text\tlabel\n"Why ""svn"" fails"\t3\nqt signals\t16\n', encoding="utf-8")
    ds = load_split("StackOverflow", "test", path=so)
    assert ds["label"] == [2, 15] and ds["text_a"][0] == 'Why "svn" fails'
    mc = tmp_path / "mcid_test.tsv"
    mc.write_bytes(b"text\tlabel\r\nhow do i donate\tdonate\r\n")
    assert load_split("MCID", "test", path=mc)["label"] == [2]
    # a labelled GLUE-format test file, and MRPC's raw layout (BOM, Quality column)
    rte = tmp_path / "rte_test.tsv"
    rte.write_text('index\tsentence1\tsentence2\tlabel\n0\t"unbalanced\tb\tnot_entailment\n')
    assert load_split("RTE", "test", path=rte)["label"] == [1]
    mr = tmp_path / "msr_paraphrase_test.txt"
    mr.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\t\" b\n".encode())
    ds = load_split("MRPC", "test", path=mr)
    assert ds["label"] == [1] and ds["text_b"] == ['" b']
    assert compute_metric("MRPC", [1], ds["label"]) == 1.0


# --- errors ------------------------------------------------------------------------------

def test_unknown_task_lists_known():
    with pytest.raises(KeyError) as e:
        get_task("mnli")
    assert isinstance(e.value, UnknownTaskError) and isinstance(e.value, ValueError)
    assert "RTE" in str(e.value) and "StackOverflow" in str(e.value)


def test_malformed_row_names_file_and_line(tmp_path):
    f = tmp_path / "bad.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly-two\tentailment\n")
    with pytest.raises(TaskError, match=r"bad\.tsv, line 3: malformed row: expected 4 fields"):
        load_split("RTE", "dev", path=f)


def test_malformed_jsonl_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"t": "a", "l": "x"}\n{oops\n')
    with pytest.raises(TaskError, match=r"t\.jsonl, line 2: invalid JSON"):
        task_from_file("j", f, text_a="t", label="l")


def test_unknown_label(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    with pytest.raises(TaskError) as e:
        load_split("SST2", "dev", path=f)
    msg = str(e.value)
    assert "dev.tsv, line 3" in msg and "'7'" in msg and "'0', '1'" in msg


def test_missing_label_column_outside_test(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("sentence\nfine\n")
    with pytest.raises(TaskError, match="no label column 'label'"):
        load_split("SST2", "train", path=f)
    assert load_split("SST2", "test", path=f)["label"] == [-1]


def test_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent") as e:
        load_split("RTE", "dev")
    assert isinstance(e.value, TaskError)


def test_missing_file_names_full_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"RTE dev file not found: .*glue/RTE/dev\.tsv"):
        load_split("RTE", "dev")
    with pytest.raises(FileNotFoundError, match="dev_ids"):
        (tmp_path / "glue/MRPC").mkdir(parents=True)
        (tmp_path / "glue/MRPC/msr_paraphrase_train.txt").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        load_split("MRPC", "train")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["MRPC", "glue", "msr_paraphrase_train.txt"]


def test_split_without_file_says_how_to_supply():
    with pytest.raises(TaskError, match=r"QNLI has no train split in the data directory.*--train-file"):
        load_split("QNLI", "train")
    with pytest.raises(TaskError, match=r"MCID has no test split.*path="):
        load_split("MCID", "test")
    with pytest.raises(TaskError, match="unknown split"):
        load_split("RTE", "training")


# --- metrics -----------------------------------------------------------------------------

def test_accuracy():
    assert compute_metric("RTE", [0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert compute_metric("StackOverflow", [3, 19], [3, 2]) == 0.5


def test_f1_positive_class():
    # tp=2, fp=1, fn=1 -> P=R=2/3, F1=2/3; accuracy would be 0.6
    assert compute_metric("MRPC", [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)
    assert compute_metric("MRPC", [0, 0], [0, 0]) == 0.0  # no positives at all
    assert compute_metric("MRPC", [1, 0, 1], [1, 0, 1]) == 1.0


def test_metric_errors():
    with pytest.raises(TaskError, match="length"):
        compute_metric("RTE", [0, 1], [0])
    with pytest.raises(TaskError, match="unlabelled"):
        compute_metric("RTE", [0], [-1])
