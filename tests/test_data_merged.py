"""The merged benchmark's data layer: nih and hannover adapters, patients linked through duplicate
images, honest patient ids (issue 11 §2), and the scalable near-duplicate search (issue 15 §9)."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.cli import main
from covidcxr.data import ManifestError, audit_manifest, build_manifest, keep_labels, load_source
from covidcxr.data.hashing import near_pair_arrays, near_pairs
from test_data_factories import distinct_image, make_manifest_set, write_png

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def make_nih(root: Path) -> Path:
    """NIH layout: Data_Entry_2017_v2020.csv (as NIH writes it) + images/."""
    (root / "images").mkdir(parents=True)
    rows = [("00000001_000.png", "No Finding", 0, 1, "AP"),
            ("00000001_001.png", "Edema|Infiltration|Pneumonia", 1, 1, "AP"),  # follow-up, same patient
            ("00000002_000.png", "Pneumonia", 0, 2, "PA"),
            ("00000003_000.png", "Effusion|Mass", 0, 3, "PA"),  # other findings: dropped by default
            ("00000004_000.png", "No Finding", 0, 4, "LL"),  # lateral: dropped
            ("00000005_000.png", "No Finding", 0, 5, "PA")]  # image missing: dropped
    lines = [NIH_HEADER]
    for k, (name, findings, fu, pid, view) in enumerate(rows):
        lines.append(f"{name},{findings},{fu},{pid},50,M,{view},2500,2048,0.168,0.168\n")
        if pid != 5:
            write_png(root / "images" / name, distinct_image(300 + k))
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    return root


def make_hannover(root: Path) -> Path:
    (root / "png").mkdir(parents=True)
    rows = ["patient_id,image_id,sex,age,admission_offset,modality,projection"]
    for k, (pid, img, proj) in enumerate([("aa11", "f001", "ap"), ("aa11", "f002", "pa"), ("bb22", "f003", "ap"),
                                          ("bb22", "f004", "ll")]):
        rows.append(f"{pid},{img},f,,{k},CR,{proj}")
        write_png(root / "png" / f"{img}.png", distinct_image(400 + k))
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def test_nih_adapter_labels_patients_views_and_findings(tmp_path):
    root = make_nih(tmp_path / "nih")
    df, dropped = load_source("nih", root)
    assert df.set_index("path")["label"].rename(lambda p: Path(p).name).to_dict() == {
        "00000001_000.png": "normal", "00000001_001.png": "pneumonia", "00000002_000.png": "pneumonia"}
    assert set(df["patient_id"]) == {"nih-1", "nih-2"}  # the follow-up stays with its patient
    assert df["findings"].tolist() == ["No Finding", "Edema|Infiltration|Pneumonia", "Pneumonia"]  # raw, '|'-separated
    assert df["view"].tolist() == ["AP", "AP", "PA"] and set(df["source"]) == {"nih"}
    assert dropped == {"other finding (not No Finding / Pneumonia)": 1, "not frontal": 1, "image file missing": 1}
    kept, dropped = load_source("nih", root, keep_other_findings=True)
    other = kept[kept["label"] == "other"]
    assert other["findings"].tolist() == ["Effusion|Mass"] and "other finding" not in str(dropped)
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Labels\nx.png,No Finding\n")
    with pytest.raises(ManifestError, match="not the NIH ChestX-ray14 layout"):
        load_source("nih", root)


def test_hannover_adapter(tmp_path):
    df, dropped = load_source("hannover", make_hannover(tmp_path / "h"))
    assert df["patient_id"].tolist() == ["hannover-aa11", "hannover-aa11", "hannover-bb22"]
    assert set(df["label"]) == {"COVID-19"} and df["view"].tolist() == ["AP", "PA", "AP"]
    assert dropped == {"not frontal": 1}
    with pytest.raises(ManifestError, match="hannover source folder not found"):
        load_source("hannover", tmp_path / "nope")


def test_merged_build_keeps_findings_and_source_ids(tmp_path):
    csv = make_manifest_set(tmp_path / "csv", n_patients=10, images_per_patient=1)
    df = build_manifest([("csv", str(csv)), ("nih", str(make_nih(tmp_path / "nih"))),
                         ("hannover", str(make_hannover(tmp_path / "h")))], tmp_path / "o", seed=1)
    m = pd.read_csv(tmp_path / "o" / "manifest.csv")
    assert {"findings", "source_patient_id", "patient_id_from", "sha1", "phash"} <= set(m.columns)
    nih = m[m["source"] == "nih"]
    assert nih["findings"].notna().all() and m.loc[m["source"] != "nih", "findings"].isna().all()
    assert (df["patient_id"] == df["source_patient_id"]).all()  # nothing shared: nobody linked
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| pneumonia | nih |" in md and "| COVID-19 | hannover |" in md


# --------------------------------------------------------------------------- issue 11 §2: patient ids


def test_csv_without_patient_column_is_an_error_unless_ids_are_invented(tmp_path, capsys):
    csv = make_manifest_set(tmp_path / "s", n_patients=12, images_per_patient=2)
    meta = pd.read_csv(csv).drop(columns=["patient_id"])
    meta.to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=r"metadata.csv: no patient id column .*--patient-id-from"):
        build_manifest([("csv", str(csv))], tmp_path / "o")
    assert main(["data", "build", "--source", f"csv={csv}", "--out", str(tmp_path / "o")]) == 1
    assert "--patient-id-from" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.csv").exists()

    assert main(["data", "build", "--source", f"csv={csv}", "--out", str(tmp_path / "o"),
                 "--patient-id-from", "image"]) == 0
    assert "patient ids invented from the image for 24 of 24 row(s)" in capsys.readouterr().out
    r = audit_manifest(tmp_path / "o" / "manifest.csv")
    assert r["leak"] is False and r["patient_leakage_checked"] is False
    assert r["patient_ids_invented"] == {"images": 24, "by_method": {"image": 24}}
    md = (tmp_path / "o" / "audit.md").read_text()
    assert "no patient or image leaks" not in md and "patient leaks NOT checked" in md
    assert any("INVENTED" in w for w in r["warnings"])


def test_csv_empty_patient_cells_are_an_error(tmp_path):
    csv = make_manifest_set(tmp_path / "s", n_patients=6, images_per_patient=1)
    meta = pd.read_csv(csv, dtype=str, keep_default_na=False)
    meta.loc[2, "patient_id"] = ""
    meta.to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=r"1 row\(s\) with an empty patient id \(e.g. p2_0.png\)"):
        load_source("csv", csv)
    df, _ = load_source("csv", csv, patient_id_from="filename")
    assert df.set_index("patient_id")["patient_id_from"].to_dict()["csv-p2_0"] == "filename"
    assert (df["patient_id_from"] == "source").sum() == 5


def test_label_fallback_to_finding_is_announced(tmp_path):
    csv = make_manifest_set(tmp_path / "s", n_patients=5, images_per_patient=1)
    meta = pd.read_csv(csv)
    meta["finding"] = meta.pop("label").map({"COVID-19": "COVID-19", "pneumonia": "Streptococcus", "normal": "ARDS"})
    meta.to_csv(csv, index=False)
    df, dropped = load_source("csv", csv)
    note = df.attrs["notes"][0]
    assert "no label column: the label of 4 row(s) was mapped from the 'finding' column" in note
    assert "1 row(s) not mapped and dropped" in note and dropped == {"label not mapped": 1}
    build_manifest([("csv", str(csv))], tmp_path / "o", seed=0)
    assert "mapped from the 'finding' column" in (tmp_path / "o" / "summary.md").read_text()


def test_keep_labels_says_what_training_leaves_out(caplog):
    df = pd.DataFrame({"label": ["normal", "other", "other", "COVID-19", "pneumonia", "other"],
                       "split": ["train", "train", "val", "test", "train", None]})
    with caplog.at_level(logging.WARNING):
        kept, dropped = keep_labels(df, ["normal", "pneumonia", "COVID-19"], where="m.csv")
    assert dropped == {"other": 2} and len(kept) == 4  # the split-less row is never used, so kept
    assert "m.csv: left out 2 of 6 row(s)" in caplog.text and "other (2)" in caplog.text
    kept, dropped = keep_labels(df, ["normal", "pneumonia", "COVID-19"], label_filter=["COVID-19", "normal"])
    assert dropped == {"other": 2, "pneumonia": 1}


# --------------------------------------------------------------------------- issue 15 §9: near-duplicate search


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 10), replace=False)) for _ in base],
                     dtype=np.uint64)
    h = np.concatenate([base, base ^ flips, base[:50]])
    full = np.bitwise_count(h[:, None] ^ h[None, :])
    for bits in (0, 3, 6, 12, 20):
        bi, bj = np.nonzero(np.triu(full <= bits, 1))
        i, j, d = near_pair_arrays(h, bits, block=64)
        assert list(zip(i.tolist(), j.tolist())) == list(zip(bi.tolist(), bj.tolist()))
        assert (d == full[i, j]).all()
    assert near_pairs(h[:3], 6) == [] or all(a < b for a, b, _ in near_pairs(h[:3], 6))


def test_near_pairs_memory_does_not_grow_with_n_squared():
    """The old search built a 2048 x N x 64-byte array: 650 MB at N = 5000. Now a few MB."""
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64)
    h[4999] = h[7] ^ np.uint64(0b1011)  # one planted pair, 3 bits apart
    tracemalloc.start()
    i, j, d = near_pair_arrays(h, 6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (i.tolist(), j.tolist(), d.tolist()) == ([7], [4999], [3])
    assert peak < 50e6, peak


# --------------------------------------------------------------------------- shared data: the real overlap


@pytest.fixture(scope="module")
def cohen_hannover(dev_dir, shared_dir, tmp_path_factory):
    hann = shared_dir / "hannover-covid"
    if not (hann / "data.csv").is_file():
        pytest.skip(f"hannover-covid not found at {hann}")
    out = tmp_path_factory.mktemp("merged")
    df = build_manifest([("csv", str(dev_dir / "metadata.csv")), ("hannover", str(hann))], out, seed=62)
    return df, out


def test_hannover_patients_linked_to_their_cohen_ids_and_kept_in_one_split(cohen_hannover):
    """53 Hannover pictures are Cohen images (cohen_NNNN_<image_id>.jpg) under other patient ids."""
    df, out = cohen_hannover
    name = df["path"].map(lambda p: Path(p).name)
    person = dict(zip(name, df["patient_id"]))
    pairs = [(n, n.split("_")[-1].replace(".jpg", ".png")) for n in name if n.startswith("cohen_")]
    pairs = [(a, b) for a, b in pairs if b in person]
    assert len(pairs) == 53
    assert all(person[a] == person[b] for a, b in pairs)  # each copy joins its two patient ids
    # no linked person spans two splits, and neither does any source patient
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert (df.groupby("source_patient_id")["split"].nunique() == 1).all()
    hann = df[df["source"] == "hannover"]
    linked = hann.loc[hann["patient_id"] != hann["source_patient_id"], "source_patient_id"].nunique()
    assert linked == 28  # the README: the 53 pictures belong to 28 of the 44 patients
    summary = (out / "summary.md").read_text()
    assert "## Patients linked through duplicate images" in summary


def test_audit_reports_links_and_passes_on_merged_build(cohen_hannover):
    df, out = cohen_hannover
    r = audit_manifest(out / "manifest.csv")
    assert r["leak"] is False, r["warnings"]
    assert r["linked"]["persons"] >= 28 and r["linked"]["linking_images"] >= 53
    assert r["unlinked_duplicates"]["pairs"] == 0
    md = (out / "audit.md").read_text()
    assert "## Patients linked across sources" in md and "hannover-" in md


def test_similar_hashes_of_different_films_are_not_linked(shared_dir, dev_dir):
    """A Cohen figure and an NIH film 6 phash bits apart are different pictures: the keypoint check
    rejects them, so they do not merge two people."""
    from covidcxr.data.duplicates import duplicate_pairs, image_features

    nih = shared_dir / "nih-cxr14-subset" / "images" / "00002939_002.png"
    cohen = dev_dir / "images" / "cohen_0436_11547_2020_1203_Fig2_HTML-b.jpg"
    if not (nih.is_file() and cohen.is_file()):
        pytest.skip("the NIH/Cohen example pair is not in the shared data")
    f = image_features([str(cohen), str(nih)])
    assert len(near_pairs(f.hashes, 6)) == 1  # the hash alone would call them the same picture
    assert duplicate_pairs(f) == []


def test_rotated_cropped_copy_is_found(dev_dir, tmp_path):
    """The Cohen re-publication pattern (straightened, cropped, squared) on a real film."""
    import cv2

    from covidcxr.data.duplicates import duplicate_pairs, image_features
    from covidcxr.io import read_image

    src = dev_dir / "images" / "cohen_0044_pneumonia-7.jpg"
    if not src.is_file():
        pytest.skip(f"{src} not in the shared data")
    img = read_image(src)
    h, w = img.shape
    rot = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 5, 1.0), (w, h))
    crop = rot[int(0.08 * h):int(0.95 * h), int(0.06 * w):int(0.9 * w)]
    crop = cv2.resize(crop, (int(crop.shape[1] * 0.8 * 1.1), int(crop.shape[0] * 0.8)))  # rescaled, aspect +10 %
    write_png(tmp_path / "copy.png", (crop * 255).astype(np.uint8))
    other = dev_dir / "images" / "cohen_0021_nejmoa2001191_f1-PA.jpg"
    f = image_features([str(src), str(tmp_path / "copy.png"), str(other)])
    pairs = duplicate_pairs(f)
    assert [(i, j) for i, j, _, _ in pairs] == [(0, 1)]


def test_datamodule_label_filter_says_what_it_leaves_out(tmp_path, caplog):
    from covidcxr.data import CXRDataModule

    csv = make_manifest_set(tmp_path / "s", n_patients=10, images_per_patient=1)
    build_manifest([("csv", str(csv))], tmp_path / "o", seed=0, near_duplicates=False)
    with caplog.at_level(logging.WARNING):
        dm = CXRDataModule(tmp_path / "o" / "manifest.csv", "covidnet@224", label_filter=["COVID-19", "normal"])
        dm.setup()
    assert "left out 2 of 10 row(s)" in caplog.text and "pneumonia (2)" in caplog.text


def test_train_prepare_says_which_labels_it_leaves_out(tmp_path, caplog):
    """`covidcxr train` used to drop rows with unknown labels (e.g. NIH 'other') without a word."""
    from covidcxr.train import load_config
    from covidcxr.train.runner import prepare

    csv = make_manifest_set(tmp_path / "s", n_patients=15, images_per_patient=1)
    build_manifest([("csv", str(csv)), ("nih", str(make_nih(tmp_path / "nih")))], tmp_path / "o", seed=0,
                   near_duplicates=False, keep_other_findings=True)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "deepcovid-resnet18.yaml", ["model.weights=none"])
    with caplog.at_level(logging.WARNING):
        _, _, _, summary = prepare(cfg, tmp_path / "o" / "manifest.csv")
    assert summary["labels_left_out"] == {"other": 1}
    assert "left out 1 of" in caplog.text and "other (1)" in caplog.text
