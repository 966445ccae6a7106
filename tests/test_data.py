"""Data formats, loss masking, truncation, packing, malformed rows."""

import json

import pytest
import torch
from conftest import tiny_llama_for

from lorakit.train import data as D


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _learned_text(example, tokenizer):
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != D.IGNORE])


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "See you."}]}


@pytest.mark.parametrize("row,learned", [
    (CHAT, "Hello!<|im_end|>\nSee you.<|im_end|>\n"),
    ({"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
     "Hello!<|im_end|>\n"),
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "5<|im_end|>\n"),
    ({"prompt": "The sky is", "completion": " blue."}, " blue.<|im_end|>"),
])
def test_loss_only_on_response_tokens(tmp_path, tiny_tokenizer, row, learned):
    (example,), _ = D.load_examples(_write(tmp_path, [row]), tiny_tokenizer, max_length=512)
    assert _learned_text(example, tiny_tokenizer) == learned
    # labels are -100 exactly on prompt tokens, and equal the input ids everywhere else
    assert all(l in (D.IGNORE, t) for t, l in zip(example.input_ids, example.labels))
    prompt_len = next(i for i, l in enumerate(example.labels) if l != D.IGNORE)
    assert all(l == D.IGNORE for l in example.labels[:prompt_len])


def test_alpaca_prompt_is_rendered_with_the_chat_template(tmp_path, tiny_tokenizer):
    (example,), _ = D.load_examples(_write(tmp_path, [{"instruction": "Add", "input": "2 and 3", "output": "5"}]),
                                    tiny_tokenizer, 512)
    assert tiny_tokenizer.decode(example.input_ids) == \
        "<|im_start|>user\nAdd\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"


def test_train_on_prompt_puts_loss_everywhere(tmp_path, tiny_tokenizer):
    (example,), _ = D.load_examples(_write(tmp_path, [CHAT]), tiny_tokenizer, 512, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_text_formats_learn_every_token(tmp_path, tiny_tokenizer):
    (example,), _ = D.load_examples(_write(tmp_path, [{"text": "plain words"}]), tiny_tokenizer, 512)
    assert example.labels == example.input_ids
    txt = tmp_path / "doc.txt"
    txt.write_text("first block\nstill first\n\nsecond block\n")
    examples, stats = D.load_examples(str(txt), tiny_tokenizer, 512)
    assert stats.rows == 2 and tiny_tokenizer.decode(examples[1].input_ids) == "second block<|im_end|>"


def test_json_list_files(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([CHAT, {"text": "x"}]))
    examples, _ = D.load_examples(str(path), tiny_tokenizer, 512)
    assert len(examples) == 2


def test_long_rows_are_truncated_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "a", "completion": " word" * 50}, {"prompt": "b", "completion": " ok"}]
    examples, stats = D.load_examples(_write(tmp_path, rows), tiny_tokenizer, max_length=16)
    assert stats.truncated == 1 and max(len(e) for e in examples) == 16


@pytest.mark.parametrize("bad,message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"question": "hi"}', "none of the known fields"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role system/user/assistant"),
    ('{"prompt": "a", "completion": 5}', "'completion' must be a string"),
    ('{"text": "ok"', "invalid JSON"),
])
def test_malformed_row_names_file_and_line(tmp_path, tiny_tokenizer, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n")
    with pytest.raises(D.DataError, match=rf"bad.jsonl:3: .*{message}"):
        D.load_examples(str(path), tiny_tokenizer, 64)


def test_split_is_deterministic_and_disjoint():
    examples = [D.Example([i, i], [i, i]) for i in range(20)]
    train, val = D.split(examples, 0.1, seed=3)
    train2, val2 = D.split(examples, 0.1, seed=3)
    assert [e.input_ids for e in val] == [e.input_ids for e in val2] and len(val) == 2 and len(train) == 18
    assert not {e.input_ids[0] for e in val} & {e.input_ids[0] for e in train}
    everything, none = D.split(examples, 0.0, seed=3)  # nothing held out: file order kept
    assert [e.input_ids for e in everything] == [e.input_ids for e in examples] and none == []


def test_packed_rows_do_not_attend_across_examples(tiny_tokenizer):
    model = tiny_llama_for(tiny_tokenizer)
    torch.manual_seed(0)
    a = D.Example(torch.randint(0, 300, (7,)).tolist(), torch.randint(0, 300, (7,)).tolist())
    b = D.Example(torch.randint(0, 300, (5,)).tolist(), torch.randint(0, 300, (5,)).tolist())
    (packed,) = D.pack([a, b], max_length=16)
    assert packed.position_ids == list(range(7)) + list(range(5))
    assert packed.labels[7] == D.IGNORE  # no loss for predicting b's first token from a's last
    batch = D.collate([packed], pad_token_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits[0]  # a cache disables packed-sequence masks
        alone_b = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    assert (packed_logits[7:] - alone_b).abs().max() < 1e-5


def test_collate_pads_right_with_mask_and_ignored_labels():
    batch = D.collate([D.Example([5, 6, 7], [5, 6, 7]), D.Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, D.IGNORE, D.IGNORE]]


def test_csv_and_parquet_rows_train_as_the_same_jsonl_rows(tmp_path, tiny_tokenizer):
    import csv

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue, with a comma"},
            {"instruction": "Say hi", "input": "to Ann", "output": 'She said "hi"\nthen left.'}]
    jsonl, table, columns = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), columns)
    expected = D.load_examples(str(jsonl), tiny_tokenizer, 128)[0]
    for path in (table, columns):
        assert D.load_examples(str(path), tiny_tokenizer, 128)[0] == expected, path
    assert [line for line, _ in D.read_rows(str(table))] == [2, 3]  # where each starts (a quoted newline inside)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(D.DataError, match="empty CSV"):
        D.read_rows(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(D.DataError, match="not a readable Parquet"):
        D.read_rows(str(tmp_path / "bad.parquet"))
