"""`logo-batch nightly`: dated templates, a committed night skipped, --force, resume, and S3."""

from __future__ import annotations

import argparse
import datetime as dt
import json

import pytest

from jobs.cli import main
from jobs.nightly import night_config, parse_date, yesterday_utc
from pipeline import run_job
from pipeline.errors import InjectedFault
from tests.pipeline.conftest import settle, write_prompts

NIGHT = "2026-11-27"


def nightly_file(tmp_path, model, pool, input_uri: str, output_uri: str, storage: str = "") -> str:
    path = tmp_path / "nightly.yaml"
    path.write_text(f"model: {{path: {model}}}\nadapters: {{path: {pool}}}\ninput: {{uri: '{input_uri}'}}\n"
                    f"output: {{uri: '{output_uri}'}}\nrouting: {{k: 2}}\ngeneration: {{max_new_tokens: 2}}\n"
                    f"resources: {{actors: 1, batch_size: 4, rows_per_block: 4}}\n{storage}")
    return str(path)


def manifest(path) -> dict:
    return json.loads((path / "_manifest.json").read_text())


def test_same_night_twice_computes_once_and_force_recomputes(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in" / NIGHT, (5, 4))
    config = nightly_file(tmp_path, model, pool, f"{tmp_path}/in/{{date}}", f"{tmp_path}/out/{{date}}")
    out = tmp_path / "out" / NIGHT

    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    first = manifest(out)
    assert first["output"]["rows"] == 9 and first["report"]["rows_computed"] == 9
    assert first["input"]["uri"] == f"{tmp_path}/in/{NIGHT}"
    capsys.readouterr()

    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    assert f"{NIGHT} is already committed at {out}; nothing to do" in capsys.readouterr().out
    assert manifest(out) == first  # not touched

    assert main(["nightly", "--config", config, "--date", NIGHT, "--set", "routing.k=3"]) == 2
    assert "committed at" in capsys.readouterr().err and manifest(out) == first  # another job's night: refused

    assert main(["nightly", "--config", config, "--date", NIGHT, "--force"]) == 0
    again = manifest(out)
    assert again["report"]["rows_computed"] == 9
    assert [a["attempt"] for a in again["attempts"]] != [a["attempt"] for a in first["attempts"]]
    assert len(again["attempts"]) == 1  # the earlier files were deleted, not mixed in


def _committed_rows(out) -> int:
    """Rows a reader of the committed night gets: the files its manifest lists, all of them there."""
    import pyarrow.parquet as pq

    assert (out / "_SUCCESS").is_file()
    return sum(pq.read_table(out / f["path"]).num_rows for f in manifest(out)["output"]["files"])


def test_force_keeps_the_committed_night_readable_until_the_new_one_commits(ray_runtime, tiny_assets, tmp_path,
                                                                            capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in" / NIGHT, (8, 8))  # 4 blocks of 4 rows
    config = nightly_file(tmp_path, model, pool, f"{tmp_path}/in/{{date}}", f"{tmp_path}/out/{{date}}")
    out = tmp_path / "out" / NIGHT
    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    first = manifest(out)
    old_files = {f["path"] for f in first["output"]["files"]}

    # a replacement by another configuration, interrupted after one data file
    with pytest.raises(InjectedFault):
        run_job(night_config(config, NIGHT, {"routing.k": 3}), fail_after_files=1, progress=False, replace=True)
    settle(out / "data")
    assert manifest(out) == first and _committed_rows(out) == 16, "the old night is whole and readable"
    import pyarrow.parquet as pq

    written = sum(pq.read_table(p).num_rows for p in (out / "data").iterdir() if f"data/{p.name}" not in old_files)
    capsys.readouterr()
    assert main(["nightly", "--config", config, "--date", NIGHT, "--set", "routing.k=3"]) == 2
    assert "--force" in capsys.readouterr().err

    assert main(["nightly", "--config", config, "--date", NIGHT, "--set", "routing.k=3", "--force"]) == 0
    new = manifest(out)
    assert new["config"]["routing"]["k"] == 3 and _committed_rows(out) == 16
    # every row the interrupted replacement wrote (one file or more: the dataflow runs ahead of the
    # driver's stop) is resumed, not computed again
    assert 0 < written == new["report"]["rows_resumed"], "the interrupted replacement was resumed"
    on_disk = {f"data/{p.name}" for p in (out / "data").iterdir()}
    assert on_disk == {f["path"] for f in new["output"]["files"]} and not on_disk & old_files, "old files deleted"
    assert json.loads((out / "_SUCCESS").read_text())["config_hash"] == new["config_hash"]


def test_an_interrupted_night_resumes(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in" / NIGHT, (20, 20))  # 10 blocks: the fault comes well before the last
    config = nightly_file(tmp_path, model, pool, f"{tmp_path}/in/{{date}}", f"{tmp_path}/out/{{date}}")
    with pytest.raises(InjectedFault):
        run_job(night_config(config, NIGHT), fail_after_files=1, progress=False)
    settle(tmp_path / "out" / NIGHT / "data")
    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    done = manifest(tmp_path / "out" / NIGHT)
    assert done["output"]["rows"] == 40 and len(done["attempts"]) == 2
    assert 0 < done["report"]["rows_computed"] < 40
    assert done["report"]["rows_resumed"] == 40 - done["report"]["rows_computed"]


def test_templated_s3_uris_against_seaweedfs(ray_runtime, tiny_assets, s3_server, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (6,))
    s3_server.upload_dir(tmp_path / "in", f"nightly/prompts/{NIGHT}")
    base = f"s3://{s3_server.bucket}/nightly"
    config = nightly_file(tmp_path, model, pool, f"{base}/prompts/{{date}}/", f"{base}/results/{{date}}",
                          f"storage: {{endpoint: '{s3_server.endpoint}'}}\n")

    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    client = s3_server.client()
    marker = json.loads(client.get_object(Bucket=s3_server.bucket, Key=f"nightly/results/{NIGHT}/_SUCCESS")["Body"].read())
    assert marker["rows"] == 6
    capsys.readouterr()
    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    assert f"{NIGHT} is already committed at {base}/results/{NIGHT}" in capsys.readouterr().out


def test_dates_and_templates_are_checked(tmp_path, capsys):
    assert yesterday_utc() == (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    assert parse_date("2026-02-28") == "2026-02-28"
    for bad in ("2026-02-30", "28.11.2026", "2026-1-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="YYYY-MM-DD"):
            parse_date(bad)
    config = nightly_file(tmp_path, "m", "a", "in/{date}", "out/fixed")
    assert main(["nightly", "--config", config, "--date", NIGHT]) == 2
    assert "output.uri: has no {date} field" in capsys.readouterr().err
    assert night_config(nightly_file(tmp_path, "m", "a", "in/{date}", "o/{date}"), NIGHT).input.uri == f"in/{NIGHT}"


def test_a_night_is_compared_with_the_previous_committed_night(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    earlier = (dt.date.fromisoformat(NIGHT) - dt.timedelta(days=2)).isoformat()  # the night between: none
    for night in (earlier, NIGHT):
        write_prompts(tmp_path / "in" / night, (6,))
    config = nightly_file(tmp_path, model, pool, f"{tmp_path}/in/{{date}}", f"{tmp_path}/out/{{date}}")
    assert main(["nightly", "--config", config, "--date", earlier]) == 0
    assert "no committed night in the 31 before" in capsys.readouterr().out
    assert main(["nightly", "--config", config, "--date", NIGHT]) == 0
    assert f"compared with {earlier}" in capsys.readouterr().out
    report = (tmp_path / "out" / NIGHT / "_report" / "report.md").read_text()
    assert f"## Compared with {tmp_path}/out/{earlier}" in report and "| error rows |" in report
    cmp = json.loads((tmp_path / "out" / NIGHT / "_report" / "compare.json").read_text())
    assert cmp["A"]["output_uri"] == f"{tmp_path}/out/{earlier}" and cmp["B"]["rows"] == 6
    assert cmp["routing"]["same_ids"] == 0, "no id column and other input files: rows are not matched"
