"""Catalog schema, as named migrations applied in order and recorded.

Each migration is a function taking a DuckDB cursor. ``apply(cur)`` runs the
ones not yet recorded in ``_migrations``, each inside the caller's transaction.
Append new migrations at the end; never edit one that has shipped.

Lineage is one join away at every step::

    training_runs --(adapter_versions.training_run_id)--> adapter_versions
    adapter_versions <--(eval_runs.adapter_version_id)-- eval_runs -> eval_samples
    adapter_versions <--(merges.adapter_version_id)-- merges
    merges / adapter_versions <--(exports.merge_id / adapter_version_id)-- exports
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable


def m001_core(cur) -> None:
    cur.execute(
        """
        CREATE TABLE bases (
            name VARCHAR PRIMARY KEY,
            source VARCHAR NOT NULL,          -- what the user typed (path, hf id, gguf:path, builtin)
            kind VARCHAR NOT NULL,            -- builtin | path | hf | gguf | merged
            path VARCHAR NOT NULL,            -- folder transformers loads
            architecture VARCHAR NOT NULL,
            model_type VARCHAR,
            config JSON NOT NULL,             -- the model's config.json
            layers JSON NOT NULL,             -- {module name: [out_features, in_features]} of Linear/Embedding
            dtype VARCHAR,
            num_parameters BIGINT,
            files JSON NOT NULL,              -- {relative file: sha256}
            size_bytes BIGINT,
            merged_from_version_id BIGINT,    -- set when the base is a merged adapter
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute("CREATE SEQUENCE adapter_version_ids START 1")
    cur.execute(
        """
        CREATE TABLE adapters (
            name VARCHAR PRIMARY KEY,
            description VARCHAR,
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE adapter_versions (
            id BIGINT PRIMARY KEY DEFAULT nextval('adapter_version_ids'),
            adapter VARCHAR NOT NULL,
            version INTEGER NOT NULL,
            base VARCHAR NOT NULL,
            digest VARCHAR NOT NULL,          -- sha256 of the manifest (sorted file -> sha256)
            path VARCHAR NOT NULL,            -- store-relative snapshot folder
            files JSON NOT NULL,              -- {file: sha256}
            size_bytes BIGINT NOT NULL,
            peft_type VARCHAR NOT NULL,
            rank INTEGER NOT NULL,
            alpha DOUBLE NOT NULL,
            target_modules JSON NOT NULL,     -- resolved module suffixes, sorted
            param_count BIGINT NOT NULL,
            features JSON NOT NULL,           -- dora, rslora, bias, modules_to_save, init
            quantization VARCHAR,             -- what the adapter was trained against: none | nf4 | int8
            source VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- pending | ready
            owner_pid INTEGER,                -- pid that wrote a pending row
            training_run_id BIGINT,
            created_at TIMESTAMP NOT NULL,
            UNIQUE (adapter, version)
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE aliases (
            adapter VARCHAR NOT NULL,
            alias VARCHAR NOT NULL,
            version INTEGER NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            PRIMARY KEY (adapter, alias)
        )
        """
    )
    cur.execute("CREATE SEQUENCE alias_event_ids START 1")
    cur.execute(
        """
        CREATE TABLE alias_events (
            id BIGINT PRIMARY KEY DEFAULT nextval('alias_event_ids'),
            adapter VARCHAR NOT NULL,
            alias VARCHAR NOT NULL,
            version INTEGER,                  -- NULL when the alias was removed
            forced BOOLEAN NOT NULL DEFAULT false,
            gate JSON,                        -- the gate's numbers and reasons, if it ran
            created_at TIMESTAMP NOT NULL
        )
        """
    )


def m002_training(cur) -> None:
    cur.execute("CREATE SEQUENCE training_run_ids START 1")
    cur.execute(
        """
        CREATE TABLE training_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('training_run_ids'),
            adapter VARCHAR NOT NULL,         -- the name the run registers under
            base VARCHAR NOT NULL,
            config JSON NOT NULL,             -- fully resolved
            config_path VARCHAR,
            output_dir VARCHAR,
            data_path VARCHAR,
            data_sha256 VARCHAR,
            data_counts JSON,                 -- {train: n, eval: n, truncated: n, format: ...}
            device VARCHAR,
            precision VARCHAR,
            status VARCHAR NOT NULL,          -- running | completed | failed | interrupted
            error VARCHAR,
            started_at TIMESTAMP NOT NULL,
            ended_at TIMESTAMP,
            duration_s DOUBLE,
            steps INTEGER,
            tokens_seen BIGINT,
            tokens_per_s DOUBLE,
            loss_curve JSON,                  -- [[step, loss], ...]
            final_loss DOUBLE,
            eval_loss DOUBLE,
            cost_usd DOUBLE,
            cost_basis JSON,                  -- {device_type, usd_per_hour}
            loss_png VARCHAR,
            adapter_version_id BIGINT
        )
        """
    )


def m003_evals(cur) -> None:
    cur.execute("CREATE SEQUENCE eval_run_ids START 1")
    cur.execute(
        """
        CREATE TABLE eval_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('eval_run_ids'),
            adapter_version_id BIGINT,        -- NULL for a base-only run
            base VARCHAR NOT NULL,
            data_path VARCHAR,
            data_sha256 VARCHAR NOT NULL,
            n INTEGER NOT NULL,
            metrics JSON NOT NULL,            -- {metric: {mean, n, ci_low, ci_high, method}}
            base_metrics JSON,                -- same shape, the base on the same items
            paired JSON,                      -- {metric: {diff, ci_low, ci_high, method}}
            win_rate JSON,                    -- {rate, ci_low, ci_high, wins, ties, losses}
            decoding JSON NOT NULL,
            metric_model VARCHAR,
            seed INTEGER,
            duration_s DOUBLE,
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE eval_samples (
            run_id BIGINT NOT NULL,
            idx INTEGER NOT NULL,
            prompt VARCHAR,
            reference VARCHAR,
            output VARCHAR,
            base_output VARCHAR,
            scores JSON,                      -- {metric: value}
            base_scores JSON,
            PRIMARY KEY (run_id, idx)
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE base_eval_cache (
            key VARCHAR PRIMARY KEY,          -- sha256(base + data sha + decoding + metrics)
            base VARCHAR NOT NULL,
            payload JSON NOT NULL,            -- per-item outputs and scores
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute("CREATE SEQUENCE review_ids START 1")
    cur.execute(
        """
        CREATE TABLE reviews (
            id BIGINT PRIMARY KEY DEFAULT nextval('review_ids'),
            adapter_version_id BIGINT NOT NULL,
            eval_run_id BIGINT,
            sheet_path VARCHAR,
            n INTEGER NOT NULL,
            status VARCHAR NOT NULL,          -- exported | imported
            result JSON,
            created_at TIMESTAMP NOT NULL,
            imported_at TIMESTAMP
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE review_items (
            review_id BIGINT NOT NULL,
            row_id VARCHAR NOT NULL,
            prompt VARCHAR,
            reference VARCHAR,
            adapter_output VARCHAR,
            base_output VARCHAR,
            adapter_is_a BOOLEAN NOT NULL,    -- the blinding key, never written to the sheet
            rating VARCHAR,
            PRIMARY KEY (review_id, row_id)
        )
        """
    )


def m004_merges_exports(cur) -> None:
    cur.execute("CREATE SEQUENCE merge_ids START 1")
    cur.execute(
        """
        CREATE TABLE merges (
            id BIGINT PRIMARY KEY DEFAULT nextval('merge_ids'),
            adapter_version_id BIGINT NOT NULL,
            base VARCHAR NOT NULL,
            merged_into VARCHAR NOT NULL,     -- full-precision | dequantized-nf4
            dtype VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            files JSON NOT NULL,
            size_bytes BIGINT,
            check_result JSON,
            base_name VARCHAR,                -- the merged model's name among bases
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute("CREATE SEQUENCE export_ids START 1")
    cur.execute(
        """
        CREATE TABLE exports (
            id BIGINT PRIMARY KEY DEFAULT nextval('export_ids'),
            adapter_version_id BIGINT,
            merge_id BIGINT,
            format VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            files JSON NOT NULL,
            size_bytes BIGINT,
            method VARCHAR,
            check_result JSON,
            created_at TIMESTAMP NOT NULL
        )
        """
    )


def m005_training_runs_extra(cur) -> None:
    """Training stage: what a run was trained against and how to find/resume it."""
    cur.execute("ALTER TABLE training_runs ADD COLUMN quantization VARCHAR")  # none | nf4
    cur.execute("ALTER TABLE training_runs ADD COLUMN pid INTEGER")  # process running it
    cur.execute("ALTER TABLE training_runs ADD COLUMN checkpoint VARCHAR")  # last checkpoint folder
    cur.execute("ALTER TABLE training_runs ADD COLUMN attempts INTEGER")  # 1 + number of resumes
    cur.execute("ALTER TABLE training_runs ADD COLUMN eval_loss_before DOUBLE")  # held-out loss of the base


def m006_service(cur) -> None:
    """The hub as a service: who moved an alias and why; background jobs run by the server."""
    cur.execute("ALTER TABLE alias_events ADD COLUMN reason VARCHAR")  # required when the gate is forced
    cur.execute("ALTER TABLE alias_events ADD COLUMN actor VARCHAR")   # USER@HOST of the caller
    cur.execute("CREATE SEQUENCE job_ids START 1")
    cur.execute(
        """
        CREATE TABLE jobs (
            id BIGINT PRIMARY KEY DEFAULT nextval('job_ids'),
            kind VARCHAR NOT NULL,            -- merge | export | eval
            params JSON NOT NULL,
            state VARCHAR NOT NULL,           -- queued | running | succeeded | failed
            progress JSON,                    -- {"phase": ..., "fraction": ...}
            result JSON,
            error VARCHAR,
            error_type VARCHAR,
            actor VARCHAR,
            created_at TIMESTAMP NOT NULL,
            started_at TIMESTAMP,
            finished_at TIMESTAMP
        )
        """
    )


def m007_eval_runs_serving_config(cur) -> None:
    """Evals: the serving configuration each run measured (base + digest, quantize, dtype, device, engine).

    Existing runs get it rebuilt from what they recorded in ``decoding`` (quantize,
    dtype, device) and the base's files as the catalog knows them now; runs that
    did not record a quantization keep NULL (an unknown configuration matches none).
    """
    import json

    from loradex.evals.config import config_key, from_decoding

    # IF NOT EXISTS: development catalogs of the eval-config branch recorded this as 006_eval_runs_serving_config
    cur.execute("ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS serving_config JSON")
    cur.execute("ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS config_key VARCHAR")  # evals.config.config_key(serving_config)
    bases = {name: {"name": name, "files": json.loads(files) if isinstance(files, str) else files}
             for name, files in cur.execute("SELECT name, files FROM bases").fetchall()}
    for rid, base, decoding in cur.execute("SELECT id, base, decoding FROM eval_runs WHERE config_key IS NULL").fetchall():
        decoding = json.loads(decoding) if isinstance(decoding, str) else decoding
        cfg = from_decoding(bases.get(base), base, decoding)
        if cfg is not None:
            cur.execute("UPDATE eval_runs SET serving_config = ?, config_key = ? WHERE id = ?",
                        [json.dumps(cfg, sort_keys=True), config_key(cfg), rid])


def m008_eval_like_for_like(cur) -> None:
    """Evals: like-for-like keys, the zero-effect flag, and forgetting measurements (issue 14).

    ``compare_key`` (+ ``compare_settings``, what it hashes) says which runs may be
    ranked together (data, n, metrics, decoding, similarity model, base, serving
    config: ``evals.record.comparison_settings``); ``identical_rate`` is the share
    of items where the adapter's output equals the base's and ``zero_effect`` flags
    >= 95%. Existing runs are backfilled from what they recorded and their samples.
    ``forgetting_runs`` holds held-out loss of base and adapter on the shipped
    general-text set, per version and serving configuration (``evals.forgetting``).
    """
    import json

    from loradex.evals.record import comparison_key, comparison_settings, identical_rate, is_zero_effect

    cur.execute("ALTER TABLE eval_runs ADD COLUMN compare_key VARCHAR")
    cur.execute("ALTER TABLE eval_runs ADD COLUMN compare_settings JSON")
    cur.execute("ALTER TABLE eval_runs ADD COLUMN identical_rate DOUBLE")  # share of items with output == base output
    cur.execute("ALTER TABLE eval_runs ADD COLUMN zero_effect BOOLEAN")    # identical_rate >= 0.95

    def load(v):
        return json.loads(v) if isinstance(v, str) else v

    cols = {r[0] for r in cur.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'eval_runs'").fetchall()}
    cfg_cols = "serving_config, config_key" if "config_key" in cols else "NULL, NULL"  # applied without 007 (tests)
    rows = cur.execute(f"SELECT id, base, data_sha256, n, metrics, decoding, metric_model, {cfg_cols} "
                       "FROM eval_runs").fetchall()
    for rid, base, data_sha, n, metrics, decoding, metric_model, cfg, key in rows:
        settings = comparison_settings({"base": base, "data_sha256": data_sha, "n": n, "metrics": load(metrics),
                                        "decoding": load(decoding), "metric_model": metric_model,
                                        "serving_config": load(cfg), "config_key": key})
        samples = [{"output": o, "base_output": b, "scores": load(s), "base_scores": load(bs)} for o, b, s, bs in
                   cur.execute("SELECT output, base_output, scores, base_scores FROM eval_samples WHERE run_id = ? "
                               "ORDER BY idx", [rid]).fetchall()]
        rate = identical_rate(samples)
        cur.execute("UPDATE eval_runs SET compare_key = ?, compare_settings = ?, identical_rate = ?, zero_effect = ? "
                    "WHERE id = ?", [comparison_key(settings), json.dumps(settings, sort_keys=True), rate,
                                     is_zero_effect(rate), rid])
    cur.execute("CREATE SEQUENCE forgetting_run_ids START 1")
    cur.execute(
        """
        CREATE TABLE forgetting_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('forgetting_run_ids'),
            adapter_version_id BIGINT NOT NULL,
            base VARCHAR NOT NULL,
            data_path VARCHAR NOT NULL,       -- the general-text set (evals/data/general.jsonl unless given)
            data_sha256 VARCHAR NOT NULL,
            n INTEGER NOT NULL,               -- passages
            tokens BIGINT,                    -- scored tokens over all passages
            serving_config JSON,
            config_key VARCHAR,
            base_nll JSON NOT NULL,           -- {mean, n, ci_low, ci_high, method, std}: mean token NLL per passage
            adapter_nll JSON NOT NULL,
            diff DOUBLE NOT NULL,             -- adapter - base, nats/token (positive = forgetting)
            ci_low DOUBLE NOT NULL,
            ci_high DOUBLE NOT NULL,
            method VARCHAR,
            eval_run_id BIGINT,               -- the task eval it ran with, if any
            duration_s DOUBLE,
            created_at TIMESTAMP NOT NULL
        )
        """
    )


def m009_judges_reviews_dpo(cur) -> None:
    """Judges, reviews and the loop: pairwise judge verdicts per eval item, review rows linked to their
    eval sample, and the training method (sft | dpo) with the adapter a preference run continued."""
    cur.execute("CREATE SEQUENCE judge_run_ids START 1")
    cur.execute(
        """
        CREATE TABLE judge_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('judge_run_ids'),
            eval_run_id BIGINT NOT NULL,      -- whose adapter and base outputs were judged
            judge VARCHAR NOT NULL,           -- what the user typed: a hub ref or an OpenAI-compatible URL
            judge_kind VARCHAR NOT NULL,      -- hub | url
            judge_model VARCHAR,              -- the resolved model (NAME@V, base name, or the URL's model id)
            prompt_version VARCHAR NOT NULL,  -- evals.judge.PROMPT_VERSION
            n INTEGER NOT NULL,
            summary JSON NOT NULL,            -- preference + CI, position consistency, bias, counts
            settings JSON,                    -- max_tokens, temperature, ...
            duration_s DOUBLE,
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE judge_samples (
            judge_run_id BIGINT NOT NULL,
            idx INTEGER NOT NULL,             -- eval_samples.idx
            verdict_ab VARCHAR,               -- A | B | tie | NULL (unparsed); order 1: adapter shown as A
            verdict_ba VARCHAR,               -- order 2: adapter shown as B
            winner_ab VARCHAR,                -- adapter | base | tie | NULL
            winner_ba VARCHAR,
            consistent BOOLEAN NOT NULL,      -- both parsed and the same winner in both orders
            score DOUBLE,                     -- adapter's preference on the item (1, 0.5, 0), NULL if unparsed
            raw_ab VARCHAR,                   -- the judge's full answer (rationale + verdict), order 1
            raw_ba VARCHAR,
            PRIMARY KEY (judge_run_id, idx)
        )
        """
    )
    cur.execute("ALTER TABLE review_items ADD COLUMN IF NOT EXISTS sample_idx INTEGER")  # eval_samples.idx
    cur.execute("ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS method VARCHAR")  # sft | dpo (NULL: sft)
    cur.execute("ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS parent_version_id BIGINT")  # adapter continued
    # dpo: log-prob margin (chosen - rejected) and pair accuracy on the training pairs, before and after
    cur.execute("ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS preference JSON")


MIGRATIONS: list[tuple[str, Callable]] = [
    ("001_core", m001_core),
    ("002_training", m002_training),
    ("003_evals", m003_evals),
    ("004_merges_exports", m004_merges_exports),
    ("005_training_runs_extra", m005_training_runs_extra),
    ("006_service", m006_service),
    ("007_eval_runs_serving_config", m007_eval_runs_serving_config),
    ("008_eval_like_for_like", m008_eval_like_for_like),
    ("009_judges_reviews_dpo", m009_judges_reviews_dpo),
]


def apply(cur, migrations: list[tuple[str, Callable]] | None = None) -> list[str]:
    """Apply pending migrations in order; return the names applied."""
    migrations = MIGRATIONS if migrations is None else migrations
    cur.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    done = {row[0] for row in cur.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for name, fn in migrations:
        if name in done:
            continue
        fn(cur)
        cur.execute("INSERT INTO _migrations VALUES (?, ?)", [name, datetime.now(timezone.utc).replace(tzinfo=None)])
        applied.append(name)
    return applied
