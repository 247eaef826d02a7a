"""build_manifest: patient-level, stratified, deterministic splits; holdout; duplicate grouping; audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from covidcxr.cli import main
from covidcxr.data import ManifestError, audit_manifest, build_manifest, read_manifest, write_manifest
from test_data_factories import make_manifest_set


@pytest.fixture(scope="module")
def gen_csv(tmp_path_factory) -> Path:
    return make_manifest_set(tmp_path_factory.mktemp("gen"), n_patients=40, images_per_patient=2)


def _overlap(df: pd.DataFrame) -> int:
    return int((df.groupby("patient_id")["split"].nunique() > 1).sum())


def test_split_deterministic_and_patient_level(gen_csv, tmp_path):
    a = build_manifest([("csv", str(gen_csv))], tmp_path / "a", seed=3)
    b = build_manifest([("csv", str(gen_csv))], tmp_path / "b", seed=3)
    c = build_manifest([("csv", str(gen_csv))], tmp_path / "c", seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c.set_index("path").loc[a["path"], "split"].reset_index(drop=True))
    assert _overlap(a) == 0 and _overlap(c) == 0
    assert set(a["split"]) == {"train", "val", "test"}
    # stratified: every label appears in train and test, and test holds ~20% of each label
    for lab, grp in a.groupby("label"):
        frac = (grp["split"] == "test").mean()
        assert 0.1 <= frac <= 0.3, (lab, frac)
        assert (grp["split"] == "train").any()


def test_split_independent_of_row_order(gen_csv, tmp_path):
    meta = pd.read_csv(gen_csv)
    shuffled = gen_csv.parent / "shuffled.csv"
    meta.sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
    a = build_manifest([("csv", str(gen_csv))], tmp_path / "a", seed=7).set_index("path")["split"]
    b = build_manifest([("csv", str(shuffled))], tmp_path / "b", seed=7).set_index("path")["split"]
    assert a.sort_index().equals(b.sort_index())


def test_manifest_files_and_roundtrip(gen_csv, tmp_path):
    build_manifest([("csv", str(gen_csv))], tmp_path / "o", seed=0)
    for f in ("manifest.csv", "summary.json", "summary.md"):
        assert (tmp_path / "o" / f).is_file()
    m = read_manifest(tmp_path / "o" / "manifest.csv", require_split=True)
    assert list(m.columns[:5]) == ["patient_id", "path", "label", "source", "split"]
    assert {"view", "geographic_extent", "opacity"} <= set(m.columns)
    # relative paths resolve against the manifest's folder
    write_manifest(m, tmp_path / "o" / "rel.csv", relative=True)
    assert not pd.read_csv(tmp_path / "o" / "rel.csv")["path"].str.startswith("/").any()
    assert read_manifest(tmp_path / "o" / "rel.csv")["path"].tolist() == m["path"].tolist()


def test_holdout_source(gen_csv, tmp_path):
    df = build_manifest([("csv", str(gen_csv))], tmp_path / "h", seed=0, holdout_source="site1")
    assert (df.loc[df["source"] == "site1", "split"] == "test").all()
    assert (df.loc[df["source"] != "site1", "split"] != "test").all()
    assert set(df["split"]) == {"train", "val", "test"}
    with pytest.raises(ManifestError, match="holdout source 'nope'"):
        build_manifest([("csv", str(gen_csv))], tmp_path / "h2", holdout_source="nope")


def test_duplicates_keep_patients_together(tmp_path):
    root = tmp_path / "dups"
    make_manifest_set(root, n_patients=20, images_per_patient=1)
    meta = pd.read_csv(root / "metadata.csv")
    # the same X-ray filed under two patients, once byte-identical and once re-encoded smaller
    shutil.copy(root / "images" / "p0_0.png", root / "images" / "copy.png")
    Image.open(root / "images" / "p1_0.png").resize((80, 80)).save(root / "images" / "resized.png")
    extra = pd.DataFrame([{**meta.iloc[0].to_dict(), "filename": "copy.png", "patient_id": "other-A"},
                          {**meta.iloc[1].to_dict(), "filename": "resized.png", "patient_id": "other-B"}])
    pd.concat([meta, extra]).to_csv(root / "metadata.csv", index=False)
    for seed in range(4):
        df = build_manifest([("csv", str(root / "metadata.csv"))], tmp_path / f"o{seed}", seed=seed)
        assert "copy.png" not in set(df["path"].map(lambda p: Path(p).name))  # exact duplicate dropped
        split = dict(zip(df["source_patient_id"], df["split"]))
        assert split["other-B"] == split["gen-1"]
        # linked: one person id for both, so the patient bootstrap groups them too
        person = dict(zip(df["source_patient_id"], df["patient_id"]))
        assert person["other-B"] == person["gen-1"] == "gen-1"
        # the kept copy names the dropped one it stands for (other-A had only that image)
        kept = df.loc[df["path"].str.endswith("p0_0.png"), "duplicate_of"].iloc[0]
        assert kept.endswith("copy.png")
        assert audit_manifest(tmp_path / f"o{seed}" / "manifest.csv")["leak"] is False


def test_bad_image_dropped_and_reported(tmp_path):
    root = tmp_path / "bad"
    make_manifest_set(root, n_patients=6, images_per_patient=1)
    (root / "images" / "p0_0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    df = build_manifest([("csv", str(root / "metadata.csv"))], tmp_path / "o", seed=0)
    assert len(df) == 5
    assert "unreadable image" in (tmp_path / "o" / "summary.md").read_text()


def test_dev_manifest_fixture(dev_manifest):
    m = read_manifest(dev_manifest, require_split=True)
    assert len(m) == 443 and _overlap(m) == 0
    assert {"geographic_extent", "opacity", "mask_path", "view"} <= set(m.columns)
    for lab in ("normal", "pneumonia", "COVID-19"):
        assert set(m.loc[m["label"] == lab, "split"]) == {"train", "val", "test"}


# --------------------------------------------------------------------------- audit


def test_audit_finds_planted_leakage_and_duplicates(gen_csv, tmp_path):
    df = build_manifest([("csv", str(gen_csv))], tmp_path / "clean", seed=0)
    clean = audit_manifest(tmp_path / "clean" / "manifest.csv")
    assert clean["leak"] is False and (tmp_path / "clean" / "audit.md").is_file()
    assert all(v["count"] == 0 for v in clean["patient_overlap"].values())

    leaky = df.copy()
    train_pat = leaky.loc[leaky["split"] == "train", "patient_id"].iloc[0]
    first = leaky.index[leaky["patient_id"] == train_pat][0]
    leaky.loc[first, "split"] = "test"  # planted: one patient in train and test
    test_rows = leaky[leaky["split"] == "test"]
    src = Path(test_rows["path"].iloc[-1])
    img_dir = tmp_path / "planted"
    img_dir.mkdir()
    shutil.copy(src, img_dir / "exact.png")  # planted: byte-identical copy under a new patient in train
    Image.open(test_rows["path"].iloc[-2]).resize((120, 120)).save(img_dir / "near.png")  # planted: rescaled copy
    plant = pd.DataFrame([
        {**leaky.iloc[0].to_dict(), "path": str(img_dir / "exact.png"), "patient_id": "planted-1", "split": "train"},
        {**leaky.iloc[0].to_dict(), "path": str(img_dir / "near.png"), "patient_id": "planted-2", "split": "val"},
    ])
    leaky = pd.concat([leaky, plant], ignore_index=True)
    leaky.to_csv(tmp_path / "leaky.csv", index=False)
    r = audit_manifest(tmp_path / "leaky.csv", out_dir=tmp_path / "aud")
    assert r["leak"] is True
    assert r["patient_overlap"]["train/test"]["count"] == 1
    assert r["patient_overlap"]["train/test"]["examples"] == [train_pat]
    assert r["exact_duplicates"]["across_splits"] == 1
    near = r["near_duplicates"]["examples"]
    assert any(str(img_dir / "near.png") in ex["paths"] for ex in near)
    md = (tmp_path / "aud" / "audit.md").read_text()
    assert "LEAKAGE FOUND" in md
    # the CLI exits 1 on leakage, 0 when clean
    assert main(["data", "audit", str(tmp_path / "leaky.csv"), "--out", str(tmp_path / "aud2")]) == 1
    assert main(["data", "audit", str(tmp_path / "clean" / "manifest.csv")]) == 0


def test_audit_confounding_warning(tmp_path):
    root = tmp_path / "conf"
    csv = make_manifest_set(root, n_patients=24, images_per_patient=1)
    meta = pd.read_csv(csv)
    meta["source"] = meta["label"].map({"COVID-19": "papers", "pneumonia": "hospital", "normal": "hospital"})
    meta.to_csv(csv, index=False)
    build_manifest([("csv", str(csv))], tmp_path / "o", seed=0)
    r = audit_manifest(tmp_path / "o" / "manifest.csv")
    sp = r["source_predicts_label"]
    assert sp["confounded"] and sp["per_class_source_auc"]["COVID-19"] == pytest.approx(1.0)
    assert any(w.startswith("CONFOUNDING") for w in r["warnings"])


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv: manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.csv").write_text("path,label\na.png,normal\n")
    with pytest.raises(ManifestError, match=r"m.csv: manifest lacks required column\(s\) \['patient_id', 'source'\]"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "s.csv").write_text("patient_id,path,label,source,split\np,a.png,normal,x,training\n")
    with pytest.raises(ManifestError, match="s.csv: unknown split"):
        read_manifest(tmp_path / "s.csv")
    (tmp_path / "o.csv").write_text("patient_id,path,label,source,split\np,a.png,normal,x,train\np,b.png,normal,x,test\n")
    with pytest.raises(ManifestError, match="o.csv: 1 patient"):
        read_manifest(tmp_path / "o.csv")


def test_cli_build_and_inspect(gen_csv, tmp_path, capsys, samples_dir):
    assert main(["data", "build", "--source", f"csv={gen_csv}", "--out", str(tmp_path / "o"), "--seed", "62"]) == 0
    assert "train" in capsys.readouterr().out
    assert (tmp_path / "o" / "manifest.csv").is_file()
    assert main(["data", "build", "--source", "nonsense", "--out", str(tmp_path / "x")]) == 1
    assert "KIND=PATH" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    rc = main(["inspect", str(samples_dir / "monochrome1-sample.dcm"), str(bad), str(empty)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "MONOCHROME1" in out and "1024x1024" in out
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and str(bad) in lines[0] and "empty" in lines[1]
    assert "Traceback" not in err


def test_a_manifest_listing_one_image_twice_warns_and_evaluate_refuses_it(tmp_path, caplog):
    import logging

    from covidcxr.data.manifest import read_manifest, repeated_images

    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png", "b.png", "a.png"], "label": ["normal", "COVID-19", "normal"],
                  "patient_id": ["p1", "p2", "p1"], "source": ["s"] * 3}).to_csv(m, index=False)
    with caplog.at_level(logging.WARNING, logger="covidcxr.data.manifest"):
        df = read_manifest(m)  # training may oversample on purpose: a warning
    assert len(df) == 3 and any("1 row(s) repeat an image" in r.getMessage() for r in caplog.records)
    msg = repeated_images(df, m)
    assert "line 4" in msg and "a.png" in msg and "\n" not in msg
