"""What the PostgreSQL store does beyond the contract: migrations, chunked artifacts, the URL,
a dropped connection. On a real server (tests/conftest.py `postgres`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aitbc.coordinator import pgstore
from aitbc.coordinator.pgstore import PostgresJobStore, load_migrations
from aitbc.errors import FailedPrecondition, InvalidArgument, Unavailable
from aitbc.v1 import job_pb2

SHIPPED = load_migrations()
N = SHIPPED[-1].version


def versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def folder_with(tmp_path: Path, name: str, migrations: list[pgstore.Migration], *extra: tuple[str, str]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for m in migrations:
        (d / m.name).write_text(m.sql)
    for fname, sql in extra:
        (d / fname).write_text(sql)
    return d


def test_an_empty_database_gets_every_migration_in_one_go(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    assert store.schema_version == N and versions(pg_url) == list(range(1, N + 1))
    assert {"jobs", "artifacts", "artifact_chunks", "receipts", "client_receipts", "meta", "reputation",
            "requests", "schema_version"} <= tables(pg_url)
    store.close()
    PostgresJobStore(pg_url).close()  # opening again applies nothing
    assert versions(pg_url) == list(range(1, N + 1))


def test_a_database_one_version_behind_is_brought_up_to_date_keeping_its_rows(pg_url: str, tmp_path: Path) -> None:
    # the shipped migrations but the last, then the shipped ones plus one more (a next release)
    older = folder_with(tmp_path, "older", SHIPPED[:-1])
    newer = folder_with(tmp_path, "newer", SHIPPED, (f"{N + 1:04d}_meta_note.sql",
                                                     "ALTER TABLE meta ADD COLUMN note text NOT NULL DEFAULT '';"))
    if N > 1:  # the schema as the previous release left it (this code needs the newest)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert pgstore.migrate(conn, load_migrations(older)) == N - 1
    store = PostgresJobStore(pg_url)
    store.put_meta("kept", b"across the upgrade")
    store.close()
    store = PostgresJobStore(pg_url, migrations=newer)
    assert store.schema_version == N + 1 and versions(pg_url) == list(range(1, N + 2))
    assert store.get_meta("kept") == b"across the upgrade"
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT note FROM meta WHERE key = 'kept'").fetchone() == ("",)
    store.close()


def test_a_migration_that_fails_applies_nothing(pg_url: str, tmp_path: Path) -> None:
    bad = folder_with(tmp_path, "bad", SHIPPED, (f"{N + 1:04d}_broken.sql", "ALTER TABLE no_such_table ADD x int;"))
    with pytest.raises(psycopg.errors.UndefinedTable):
        PostgresJobStore(pg_url, migrations=bad)
    assert "jobs" not in tables(pg_url)  # the shipped ones were in the same transaction


def test_a_newer_database_is_refused_with_a_clear_message(pg_url: str) -> None:
    PostgresJobStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'from the future')", (N + 1,))
    with pytest.raises(FailedPrecondition) as err:
        PostgresJobStore(pg_url)
    msg = err.value.message
    assert f"schema version {N + 1}, newer than this coordinator knows ({N})" in msg and "'database_url'" in msg


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    gap = folder_with(tmp_path, "gap", SHIPPED, (f"{N + 2:04d}_later.sql", "SELECT 1;"))
    with pytest.raises(RuntimeError, match="without gaps"):
        load_migrations(gap)


def test_coordinators_opening_an_empty_database_at_once_migrate_it_once_and_all_share_it(pg_url: str) -> None:
    stores: list[PostgresJobStore] = []
    threads = [threading.Thread(target=lambda: stores.append(PostgresJobStore(pg_url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 4 and versions(pg_url) == list(range(1, N + 1))
    assert len({s.coordinator_id for s in stores}) == 4  # each its own owner id (and lock)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM coordinators").fetchone() == (4,)
    for s in stores:
        s.close()


def test_a_large_artifact_is_stored_and_read_a_chunk_at_a_time(pg_url: str, tmp_path: Path) -> None:
    store = PostgresJobStore(pg_url, chunk_bytes=1000)
    data = bytes(range(256)) * 14  # 3,584 bytes: 4 chunks, the last one short
    upload = tmp_path / "out.part"
    upload.write_bytes(data)
    store.write([], artifacts=[("ab" * 32, upload)])
    assert not upload.exists()  # taken over
    with psycopg.connect(pg_url) as conn:
        sizes = [r[0] for r in conn.execute("SELECT length(data) FROM artifact_chunks ORDER BY n")]
    assert sizes == [1000, 1000, 1000, 584]
    f = store.open_artifact("ab" * 32)
    pieces = []
    with f:
        while piece := f.read(700):
            pieces.append(piece)
            assert len(f.raw._data) <= 1000  # type: ignore[attr-defined]  # never more than one chunk held
    assert b"".join(pieces) == data and [len(p) for p in pieces] == [700] * 5 + [84]
    store.delete_artifacts(["ab" * 32])
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM artifact_chunks").fetchone() == (0,)  # the bytes went with the record
    store.close()


def test_an_empty_artifact_reads_back_empty(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    store.write([], artifacts=[("e3" * 32, b"")])
    with store.open_artifact("e3" * 32) as f:
        assert f.read() == b""
    store.close()


def test_an_artifact_deleted_while_it_is_read_is_an_error_not_short_data(pg_url: str) -> None:
    store = PostgresJobStore(pg_url, chunk_bytes=4)
    store.write([], artifacts=[("cd" * 32, b"0123456789")])
    f = store.open_artifact("cd" * 32)
    assert f.read(4) == b"0123"
    store.delete_artifacts(["cd" * 32])
    with pytest.raises(OSError, match="deleted while it was being read"):
        f.read()
    store.close()


@pytest.mark.parametrize("url", ["mysql://u:pw@db/aitbc", "127.0.0.1:5432", "postgresql://u:pw@h/db?nonsense=1",
                                 "postgresql://u:pw@[::1/db"])
def test_a_bad_url_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        PostgresJobStore(url)
    assert "'database_url'" in err.value.message and "pw" not in err.value.message.replace("postgresql", "")


def test_the_url_is_shown_without_its_password() -> None:
    assert pgstore.display_url("postgresql://aitbc:hunter2@db.internal:6432/pool") == "postgresql://aitbc@db.internal:6432/pool"


def test_after_the_server_drops_the_connection_the_next_call_reconnects(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    store.write([job_pb2.Job(job_id="a", state=job_pb2.JOB_STATE_QUEUED)])
    pid = store.conn.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        store.get_job("a")  # the call in flight fails: the store never repeats a statement blindly
    assert store.get_job("a").job_id == "a" and store.conn.info.backend_pid != pid
    store.close()



def test_a_write_the_server_refuses_half_way_leaves_nothing_and_the_store_goes_on(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as admin:  # the server fails the receipt insert, after the job's
        admin.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
        admin.execute("CREATE TRIGGER refuse BEFORE INSERT ON receipts FOR EACH ROW EXECUTE FUNCTION refuse()")
    j = job_pb2.Job(job_id="a", client_id="alice", state=job_pb2.JOB_STATE_COMPLETED, finished_at_unix_ms=5)
    rec = j.receipt
    rec.receipt_hash = "r1"
    with pytest.raises(psycopg.errors.RaiseException, match="refused by the test"):
        store.write([j], artifacts=[("aa", b"bytes")], receipts=[(j, rec)])
    assert store.get_job("a") is None and store.open_artifact("aa") is None and store.get_receipt("r1") is None
    store.write([job_pb2.Job(job_id="b", state=job_pb2.JOB_STATE_QUEUED)])  # the connection is usable again
    assert [x.job_id for x in store.active_jobs()] == ["b"]
    store.close()


def test_the_server_binaries_are_found_on_path_or_in_debians_folder_and_missing_ones_say_make_test(tmp_path: Path) -> None:
    from aitbc.pgserver import MISSING, find_bin_dir

    assert find_bin_dir(path=str(tmp_path), debian_root=str(tmp_path)) is None
    debian = tmp_path / "lib" / "15" / "bin"
    debian.mkdir(parents=True)
    for name in ("initdb", "pg_ctl"):
        (debian / name).write_text("#!/bin/sh\n")
        (debian / name).chmod(0o755)
    assert find_bin_dir(path=str(tmp_path / "nothing"), debian_root=str(tmp_path / "lib")) == debian
    assert find_bin_dir(path=str(debian), debian_root=str(tmp_path / "none")) == debian
    assert "run `make test`" in MISSING  # what tests/conftest.py fails with (never a skip)


# ---- the awaited reads' pool (aitbc/coordinator/pgreads.py) --------------------------------------------

def read_connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                             "'aitbc-coordinator-reads' AND datname = current_database()").fetchone()[0]


async def test_reads_share_at_most_the_pools_connections_and_wait_for_a_free_one(pg_url: str) -> None:
    import asyncio

    store = PostgresJobStore(pg_url, read_pool=2)
    store.write([job_pb2.Job(job_id="a", state=job_pb2.JOB_STATE_QUEUED)])
    entered: list[int] = []
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(7)")  # the database stalls every read until it is released

        async def stall(conn: psycopg.AsyncConnection[Any]) -> None:
            entered.append(conn.info.backend_pid)
            await conn.execute("SELECT pg_advisory_lock_shared(7)")
            await conn.execute("SELECT pg_advisory_unlock_shared(7)")

        store._reads.before_read = stall
        reads = [asyncio.create_task(store.aget_job("a")) for _ in range(3)]
        while len(entered) < 2:
            await asyncio.sleep(0.01)
        for _ in range(10):  # the third read has had its turns on the loop: it waits for a free connection
            await asyncio.sleep(0)
        assert store._reads._slots is not None and store._reads._slots.locked()
        assert len(entered) == 2 and not any(r.done() for r in reads) and read_connections(pg_url) == 2
        admin.execute("SELECT pg_advisory_unlock(7)")
        assert [(await r).job_id for r in reads] == ["a", "a", "a"]
    assert len(entered) == 3 and len(set(entered)) == 2  # the third read reused a connection of the two
    store.close()
    assert eventually_zero(lambda: read_connections(pg_url))


def eventually_zero(probe: Any) -> bool:
    import time

    for _ in range(500):  # the server notices a closed connection a moment after the client closed it
        if probe() == 0:
            return True
        time.sleep(0.01)
    return False


async def test_a_read_whose_connection_the_server_dropped_is_unavailable_and_the_next_one_reconnects(
        pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    store.write([job_pb2.Job(job_id="a", state=job_pb2.JOB_STATE_QUEUED)])
    assert (await store.aget_job("a")).job_id == "a"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                      "'aitbc-coordinator-reads' AND datname = current_database()")
    with pytest.raises(Unavailable) as err:
        await store.aget_job("a")  # the read in flight fails: never repeated blindly
    assert err.value.message.startswith(f"the coordinator's database at {pgstore.display_url(pg_url)} did not answer")
    assert (await store.aget_job("a")).job_id == "a"  # a new connection
    store.close()
    with pytest.raises(Unavailable, match="stopping"):
        await store.aget_job("a")


async def test_a_database_that_cannot_be_reached_makes_the_read_unavailable_naming_it(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    store._reads.url = pg_url.replace(pg_url.rsplit("/", 1)[1], "no_such_database")  # as if it went away
    with pytest.raises(Unavailable) as err:
        await store.aget_receipt("r")
    assert "cannot be reached" in err.value.message and "no_such_database" in err.value.message
    store.close()


async def test_the_urls_statement_timeout_applies_to_the_awaited_reads(pg_url: str) -> None:
    url = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20statement_timeout%3D50"
    store = PostgresJobStore(url)

    async def slow(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_sleep(5)")  # past the 50 ms the URL allows a statement

    store._reads.before_read = slow
    with pytest.raises(Unavailable, match="cancelled the read"):
        await store.aget_job("a")
    store._reads.before_read = None
    assert await store.aget_job("a") is None  # the connection stays usable
    store.close()


def test_the_read_pool_size_is_checked_before_anything_opens(pg_url: str) -> None:
    from aitbc.config import CoordinatorConfig

    for bad in (0, 65):
        with pytest.raises(InvalidArgument, match="'database_read_pool' must be between 1 and 64"):
            CoordinatorConfig(database_url=pg_url, database_read_pool=bad)
    assert CoordinatorConfig(database_url=pg_url, database_read_pool=64).database_read_pool == 64
