"""Issue 4: the snake in P2P mode with real processes (bootstrap + nodes on 127.0.0.1, real training)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from snakenet import SnakeNet, job_toml, laps_holders, wait_event

from snakenode.snake import custody, hoplog
from snakenode.snake import state as st


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SnakeNet, str, dict]]:
    """4 nodes, digits dirichlet:0.3, one 3-lap job with KD auto, run once for several tests."""
    sn = SnakeNet(tmp_path_factory.mktemp("four"), network="four")
    try:
        for i in range(4):
            sn.add_node(f"n{i}", f"{i}/4")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=3))
        detail = sn.wait_complete(job_id, 150)
        yield sn, job_id, detail
    finally:
        sn.close()


@pytest.mark.timeout(200)
def test_job_completes_every_member_each_lap_and_log_validates(four: tuple[SnakeNet, str, dict]) -> None:
    sn, job_id, detail = four
    c = detail["summary"]["completed"]
    assert c["lap"] == 3 and c["reason"] == "laps"
    assert c["test"]["accuracy"] >= 0.85, c["test"]
    records = sn.merged_records(job_id)
    problems = hoplog.validate_log(records, detail["summary"]["blocks"])
    assert problems == [], problems
    members = {sn.ids[f"n{i}"] for i in range(4)}
    per_lap = laps_holders(records)
    assert sorted(per_lap) == [0, 1, 2]
    for lap, holders in per_lap.items():
        assert sorted(holders) == sorted(members), f"lap {lap}: {[sn.name_of(h) for h in holders]}"
    # Every hand-off along the surviving lineage has all four phases logged (the demo reports their medians).
    latency = hoplog.handoff_latency(records)
    assert latency["handoffs"] == len(hoplog.surviving_chain(records)) - 1 == 11, latency
    assert all(latency[k]["median_s"] >= 0 for k in hoplog.HANDOFF_PHASES)
    # Every node's local log is itself valid, and each one saw the completion.
    for p in sn.nodes.values():
        own = hoplog.read_log(p.home / "jobs" / job_id / "hoplog.jsonl")
        assert own and all(hoplog.validate_record(r) == [] for r in own)
    # The honest non-IID run never trips the poisoning guard.
    from harness import control

    # Every hand-over carried a chain of custody the others verified: no honest claim was refused, and each
    # node holds the signed chain of the final hop back to the submitter (snake/custody.py).
    final = hoplog.surviving_chain(records)[-1][0]["lineage"]
    for p in sn.nodes.values():
        counters = control(p.home, "status")["counters"]
        assert not counters.get("snake.poison_suspect") and not counters.get("reject.bundle.poison_suspect")
        refused = {k: v for k, v in counters.items() if "custody" in k and k.startswith(("reject.", "error."))}
        assert not refused, (p.name, refused)
        chain = [json.loads(x) for x in (p.home / "jobs" / job_id / "custody.jsonl").read_text().splitlines()]
        by_lineage = {custody.Link.from_json(x).lineage: custody.Link.from_json(x) for x in chain}
        assert final in by_lineage, p.name
        n, lineage = 0, final
        while lineage in by_lineage:
            n, lineage = n + 1, by_lineage[lineage].parent
        assert n == 12 and lineage == st.genesis_lineage(job_id), (p.name, n)
    assert not [r for r in records if r["event"] == "declined" and (r["detail"] or {}).get("reason") == "poison_suspect"]
    # Non-IID: KD was on (auto) for these skewed shards.
    trained = [r for r in records if r["event"] == "trained"]
    assert any((r["detail"] or {}).get("kd", {}).get("on") for r in trained)


@pytest.mark.timeout(120)
def test_fetched_model_is_the_final_holders_and_scores_what_the_log_says(
        four: tuple[SnakeNet, str, dict], tmp_path: Path) -> None:
    sn, job_id, detail = four
    c = detail["summary"]["completed"]
    final = sn.name_of(c["holder"])
    other = next(n for n in sn.nodes if n != final)
    out = tmp_path / "model.safetensors"
    from harness import run_cli

    r = run_cli("fetch", job_id, "--home", str(sn.net.home(other)), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    from snakenode.layers import bundle

    layers, meta = bundle.read_model_file(out.read_bytes())
    from snakenode.layers.store import sha256_hex

    assert {n: sha256_hex(b) for n, b in layers.items()} == c["model"]
    assert meta["snakenode.job_id"] == job_id and info["layers"] == c["model"]
    # The final holder's own store has exactly these layers.
    final_store = sn.net.home(final) / "store" / "blobs"
    assert all((final_store / f"{h}.safetensors").exists() for h in c["model"].values())
    # Evaluated here, in-process, the file scores what the log says.
    import tempfile

    from snakenode.train import engine
    from snakenode.train.data import DataSpec

    eng = engine.Engine(engine.default_store(tempfile.mkdtemp()))
    state = {n: eng.store.put_bytes(b) for n, b in layers.items()}
    res = eng.evaluate(detail["spec"], state, DataSpec.from_flags("digits", "dirichlet:0.3", "0/4", 0).to_dict(),
                       "test")
    assert res["accuracy"] == pytest.approx(c["test"]["accuracy"], abs=1e-9)


@pytest.mark.timeout(240)
def test_declining_member_dropped_and_mid_job_joiner_visited_next_lap(tmp_path: Path) -> None:
    """n3 always declines (and n4 has too little memory for any window): both are dropped from each lap
    and every lap still ends; n5 joins mid-job and holds the snake from the next lap on."""
    sn = SnakeNet(tmp_path, network="joiners")
    try:
        for i in range(3):
            sn.add_node(f"n{i}", f"{i}/6", extra=["--compute-slowdown", "6"])
        sn.add_node("n3", "3/6", extra=["--test-faults", "decline@accept:times=0"])
        sn.add_node("n4", "4/6", extra=["--memory-budget", "1"])
        sn.make_identity("n5")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=5, epochs=2, drop_after_s=5, max_declines=2))
        wait_event(sn, job_id, lambda r: r["event"] == "trained" and r["hop"] == 0, 90, "hop 0 to train")
        # Five slowed laps leave the joiner (worker start, data, model: a few seconds) laps to join.
        sn.add_node("n5", "5/6")
        detail = sn.wait_complete(job_id, 200)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        per_lap = laps_holders(records)
        ids = sn.ids
        assert sorted(per_lap) == [0, 1, 2, 3, 4]
        assert ids["n5"] not in per_lap[0], "a mid-lap joiner is visited only from the next lap"
        first = min(lap for lap, holders in per_lap.items() if ids["n5"] in holders)
        assert all(ids["n5"] in per_lap[lap] for lap in range(first, 5)), "once a member, visited every lap"
        for lap, holders in per_lap.items():
            assert ids["n3"] not in holders and ids["n4"] not in holders
            assert {ids["n0"], ids["n1"], ids["n2"]} <= set(holders), lap
        declined = [r for r in records if r["event"] == "declined" and r["holder"] == ids["n3"]]
        assert declined and all(r["detail"]["reason"] == "test_fault" for r in declined)
        dropped = {r["detail"]["peer"] for r in records if r["event"] == "dropped"}
        assert {ids["n3"], ids["n4"]} <= dropped
        # The joiner missed the chain of custody up to its arrival: the first progress record it heard had an
        # unknown parent, so it fetched the chain from that record's author (get_custody) and then took the
        # records of the hops before its own first hop; no claim was refused anywhere.
        from harness import control

        counters = control(sn.nodes["n5"].home, "status")["counters"]
        assert counters.get("custody.fetch", 0) >= 1, counters
        mine = min(r["hop"] for r in records if r["event"] == "received" and r["holder"] == ids["n5"])
        seen = hoplog.read_log(sn.nodes["n5"].home / "jobs" / job_id / "seen.jsonl")
        assert any(r["hop"] < mine for r in seen), "the joiner took no progress record before its own hop"
        for name, p in sn.nodes.items():
            c = control(p.home, "status")["counters"]
            refused = {k: v for k, v in c.items() if "custody" in k and k.startswith(("reject.", "error."))}
            assert not refused, (name, refused)
    finally:
        sn.close()


@pytest.mark.timeout(240)
def test_successor_killed_while_training_and_while_receiving(tmp_path: Path) -> None:
    """kill -9 (fault hooks) at the start of training on n1 and mid-bundle on n2: the job completes, the
    retries are logged, and exactly one lineage reaches the end."""
    sn = SnakeNet(tmp_path, network="faults")
    try:
        sn.add_node("n0", "0/4")
        sn.add_node("n1", "1/4", extra=["--test-faults", "exit@train"])
        sn.add_node("n2", "2/4", extra=["--test-faults", "exit@recv:after_bytes=60000,rate=2MB/s"])
        sn.add_node("n3", "3/4")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=2, drop_after_s=3))
        detail = sn.wait_complete(job_id, 200)
        n1, n2 = sn.nodes["n1"], sn.nodes["n2"]
        assert not n1.alive() and n1.popen.returncode == -signal.SIGKILL
        assert not n2.alive() and n2.popen.returncode == -signal.SIGKILL
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        retries = [r for r in records if r["event"] == "retry"]
        failed = {r["detail"]["failed_holder"] for r in retries}
        assert {sn.ids["n1"], sn.ids["n2"]} <= failed, [r["detail"] for r in retries]
        finals = {r["lineage"] for r in records if r["event"] == "job_complete"}
        assert len(finals) == 1
        for lap, holders in laps_holders(records).items():
            assert sn.ids["n1"] not in holders and sn.ids["n2"] not in holders, lap
    finally:
        sn.close()


@pytest.mark.timeout(120)
def test_poisoned_model_is_refused_and_never_adopted(tmp_path: Path) -> None:
    """n0 trains hop 0, then scales its model by 1000 before handing it on: every receiver refuses it with
    poison_suspect (the per-layer change bound), so the poison never becomes anyone's model."""
    sn = SnakeNet(tmp_path, network="poison")
    try:
        sn.add_node("n0", "0/3", extra=["--test-faults", "poison@handoff:hop=0"])
        sn.add_node("n1", "1/3")
        sn.add_node("n2", "2/3")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=1, epochs=1))
        refusals = sn.net.wait(lambda: [r for r in sn.detail(job_id)["records"] if r["event"] == "declined"
                                        and (r["detail"] or {}).get("reason") == "poison_suspect"
                                        and r["node"] == sn.ids["n0"]] or None, 90, "the poisoned model to be refused")
        assert {r["holder"] for r in refusals} <= {sn.ids["n1"], sn.ids["n2"]}
        from harness import control

        for name in ("n1", "n2"):
            counters = control(sn.net.home(name), "status")["counters"]
            if any(r["holder"] == sn.ids[name] for r in refusals):
                assert counters["reject.bundle.poison_suspect"] >= 1 and counters["snake.poison_suspect"] >= 1
            cp = sn.net.home(name) / "jobs" / job_id / "checkpoint.json"
            if cp.exists():
                import json

                assert json.loads(cp.read_text()).get("phase") not in ("received", "training", "trained")
        assert all(p.alive() for p in sn.nodes.values())
    finally:
        sn.close()


@pytest.mark.timeout(120)
def test_broken_bundle_stream_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The receiver's stream breaks after 100 kB; the next attempt to the same node resumes from the
    verified layers and the partial download instead of resending them, and the cache stays sound."""
    sn = SnakeNet(tmp_path, network="resume")
    try:
        sn.add_node("n0", "0/2")
        sn.add_node("n1", "1/2", extra=["--test-faults", "break@recv:after_bytes=100000"])
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=1, epochs=1))
        detail = sn.wait_complete(job_id, 90)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        acc = sorted((r for r in records if r["event"] == "accepted" and r["hop"] == 1), key=lambda r: r["attempt"])
        assert [r["holder"] for r in acc] == [sn.ids["n1"], sn.ids["n1"]], "the same node gets the next attempt"
        first, second = acc[0]["detail"], acc[1]["detail"]
        assert second["planned_bytes"] <= first["planned_bytes"] - 100_000
        assert second["resumed_bytes"] > 0 or second["held"] > first["held"]
        retry = [r for r in records if r["event"] == "retry" and r["hop"] == 1]
        assert retry and retry[0]["detail"]["why"] == "transfer"
        from harness import control

        st = control(sn.net.home("n1"), "status")
        assert st["counters"]["reject.bundle.test_fault"] == 1
        # Everything in n1's store is sound: every blob hashes to its name.
        from snakenode.layers.store import sha256_hex

        blobs = list((sn.net.home("n1") / "store" / "blobs").glob("*.safetensors"))
        assert blobs and all(sha256_hex(b.read_bytes()) == b.stem for b in blobs)
    finally:
        sn.close()


@pytest.mark.timeout(240)
def test_holder_killed_and_restarted_one_survivor(tmp_path: Path) -> None:
    """The holder dies while training and restarts with the same HOME after its predecessor retried the
    hop: its resume loses to the retry and is logged superseded; the job completes once. (A restart that
    beats the predecessor's detection simply resumes and renews its lease: then there is no retry.)"""
    sn = SnakeNet(tmp_path, network="restart")
    try:
        sn.add_node("n0", "0/3")
        sn.add_node("n1", "1/3", extra=["--test-faults", "exit@train:hop=1:attempt=0"])
        sn.add_node("n2", "2/3", extra=["--test-faults", "exit@train:hop=1:attempt=0"])
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=2, drop_after_s=20))
        victim = sn.net.wait(lambda: next((p for n, p in sn.nodes.items() if n != "n0" and not p.alive()), None),
                             90, "the holder of hop 1 to die")
        name = next(n for n, p in sn.nodes.items() if p is victim)
        assert victim.popen.returncode == -signal.SIGKILL
        retry = wait_event(sn, job_id, lambda r: r["event"] == "retry" and r["hop"] == 1, 30,
                           "the predecessor to retry hop 1")
        assert retry["detail"]["failed_holder"] == sn.ids[name]
        i = victim.argv.index("--test-faults")
        del victim.argv[i:i + 2]  # restart with the same home, without fault hooks
        victim.start()
        victim.wait_ready()
        detail = sn.wait_complete(job_id, 200)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        lost = [r for r in records if r["event"] == "superseded" and r["hop"] == 1 and r["attempt"] == 0]
        assert lost and lost[0]["holder"] == sn.ids[name] and lost[0]["node"] == sn.ids[name]
        assert not [r for r in records if r["event"] == "resumed" and r["hop"] == 1 and r["attempt"] == 0
                    and any(t["event"] == "trained" and t["lineage"] == r["lineage"] for t in records)]
        assert len({r["lineage"] for r in records if r["event"] == "job_complete"}) == 1
        chain_hop1 = next(g for g in hoplog.surviving_chain(records) if g[0]["hop"] == 1)
        assert chain_hop1[0]["attempt"] >= 1, "the retry is the surviving lineage"
    finally:
        sn.close()


@pytest.mark.timeout(240)
def test_llm_job_lowers_validation_perplexity(tmp_path: Path) -> None:
    sn = SnakeNet(tmp_path, network="llm")
    try:
        for i in range(3):
            sn.add_node(f"n{i}", f"{i}/3", data="text:pydoc", partition="iid")
        sn.wait_ready()
        toml = (Path(__file__).resolve().parents[1] / "jobs" / "llm-tiny.toml").read_text()
        job_id = sn.submit(toml)
        detail = sn.wait_complete(job_id, 200)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        trained = [r for r in records if r["event"] == "trained"]
        assert len({r["holder"] for r in trained}) == 3
        first, last = trained[0], trained[-1]
        assert last["metrics_after"]["perplexity"] < first["metrics_before"]["perplexity"]
        for r in trained:
            assert r["metrics_after"]["perplexity"] < r["metrics_before"]["perplexity"]
    finally:
        sn.close()
