"""Security settings without a cluster: TLS files, etcd access and API keys are validated at start;
secrets stay out of --help, reprs and child argv; and discovery works through an etcd that takes
only client certificates and a user with a password (a real etcd, set up with etcdctl)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.api_keys import MISSING, WRONG, ApiKeys
from cluster.router_settings import RouterSettings
from cluster.up_settings import UpSettings
from cluster.worker_pool import WorkerPool
from common.etcd.access import EtcdAccess
from common.etcd.lease import etcd_client
from common.pki import Pki, make_pki
from common.settings import add_settings_flags
from common.tls import TlsFiles
from common.worker_record import WorkerRecord, WorkerRegistration
from tests.support.secure_etcd import etcdctl_binary, secure_etcd
from worker_runtime.settings import WorkerSettings

PASSWORD = "etcd-pw-5a1e"


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    folder = tmp_path_factory.mktemp("pki")
    return make_pki(folder, "cluster"), make_pki(folder, "rogue")


def _access(pki: Pki, **overrides: object) -> EtcdAccess:
    values: dict = {"ca": str(pki.ca), "cert": str(pki.cert), "key": str(pki.key), "user": "tandem",
                    "password": PASSWORD}
    return EtcdAccess(**{**values, **overrides})


# -- validation ------------------------------------------------------------------------------------------
def test_tls_files_come_all_three_or_none(pkis: tuple[Pki, Pki], tmp_path: Path) -> None:
    pki = pkis[0]
    assert TlsFiles.optional(None, None, None) is None
    assert TlsFiles.optional(str(pki.ca), str(pki.cert), str(pki.key)) == TlsFiles(str(pki.ca), str(pki.cert),
                                                                                    str(pki.key))
    with pytest.raises(ValueError, match="together"):
        TlsFiles.optional(str(pki.ca), str(pki.cert), None)
    with pytest.raises(ValueError, match=r"missing\.pem"):
        TlsFiles(str(pki.ca), str(tmp_path / "missing.pem"), str(pki.key))
    with pytest.raises(ValueError, match="together"):
        WorkerSettings(etcd="h:1", tls_cert=str(pki.cert))


def test_etcd_access_is_validated_and_hides_the_password(pkis: tuple[Pki, Pki]) -> None:
    pki = pkis[0]
    with pytest.raises(ValueError, match="certificate and key"):
        EtcdAccess(ca=str(pki.ca), cert=str(pki.cert))
    with pytest.raises(ValueError, match="needs the etcd CA"):
        EtcdAccess(cert=str(pki.cert), key=str(pki.key))
    with pytest.raises(ValueError, match="user and password"):
        EtcdAccess(user="tandem")
    with pytest.raises(ValueError, match="not a file"):
        EtcdAccess(ca="/nonexistent/ca.pem")
    assert PASSWORD not in repr(_access(pki))
    assert EtcdAccess().credentials() is None and not EtcdAccess().tls


def test_api_keys_from_a_file_and_a_variable(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nkey-a\n\n   key-b  \n#key-c\n")
    keys = ApiKeys.load(str(path), "key-d, key-e")
    assert keys is not None and len(keys.digests) == 4
    for key in ("key-a", "key-b", "key-d", "key-e"):
        assert keys.accepts(f"Bearer {key}") and keys.accepts(f"bearer  {key} ")
    for header in (None, "", "Bearer", "Bearer key-c", "Bearer #key-c", "Basic key-a", "key-a", "Bearer key-a2"):
        assert not keys.accepts(header), header
    assert (keys.refusal(None), keys.refusal("Bearer x")) == (MISSING, WRONG)
    assert ApiKeys.load(None, "") is None
    path.write_text("# nothing but comments\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.load(str(path), "")
    with pytest.raises(ValueError, match="whitespace"):
        ApiKeys.load(None, "two words")


# -- secrets in flags, reprs and child processes ---------------------------------------------------------
def test_a_key_with_non_utf8_bytes_is_just_wrong() -> None:
    """aiohttp keeps undecodable header bytes as lone surrogates: a wrong key, never a 500."""
    keys = ApiKeys.load(None, "s3cret")
    assert keys is not None
    assert not keys.accepts("Bearer \udcff")
    assert keys.accepts("Bearer s3cret")


def test_secrets_stay_out_of_help_and_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_ETCD_PASSWORD", PASSWORD)
    monkeypatch.setenv("TANDEM_API_KEYS", "key-from-env")
    parser = argparse.ArgumentParser(prog="t")
    add_settings_flags(parser, RouterSettings)
    text = parser.format_help()
    assert "TANDEM_ETCD_PASSWORD" in text and "TANDEM_API_KEYS" in text and "<hidden>" in text
    assert PASSWORD not in text and "key-from-env" not in text
    assert text.index("--etcd ") < text.index("--tls-ca")  # the shared security flags come last
    settings = RouterSettings(etcd="h:1", api_keys="key-from-env", etcd_user="u", etcd_password=PASSWORD)
    assert PASSWORD not in repr(settings) and "key-from-env" not in repr(settings)


def test_up_hands_files_as_flags_and_secrets_as_variables(pkis: tuple[Pki, Pki], tmp_path: Path) -> None:
    pki = pkis[0]
    keys = tmp_path / "keys"
    keys.write_text("key-a\n")
    up = UpSettings(etcd="h:1", tls_ca=str(pki.ca), tls_cert=str(pki.cert), tls_key=str(pki.key),
                    etcd_ca=str(pki.ca), etcd_user="tandem", etcd_password=PASSWORD, api_keys_file=str(keys),
                    api_keys="key-b")
    worker, router = up.worker_args("decode", "h:1"), up.router_args("h:1")
    for args in (worker, router):
        for flag, value in (("--tls-ca", pki.ca), ("--tls-cert", pki.cert), ("--tls-key", pki.key),
                            ("--etcd-ca", pki.ca), ("--etcd-user", "tandem")):
            assert args[args.index(flag) + 1] == str(value)
        assert PASSWORD not in args and "key-b" not in args and "--etcd-password" not in args
    assert router[router.index("--api-keys-file") + 1] == str(keys) and "--api-keys-file" not in worker
    secret = up.kv_secret  # tandem up makes the cluster's KV link secret: a variable, never a flag
    assert secret is not None and len(secret) == 64 and secret != UpSettings().kv_secret
    assert up.security_env() == {"TANDEM_ETCD_PASSWORD": PASSWORD, "TANDEM_KV_SECRET": secret}
    assert up.router_env() == {"TANDEM_ETCD_PASSWORD": PASSWORD, "TANDEM_API_KEYS": "key-b"}  # no KV secret
    assert secret not in worker and up.worker_settings("decode", "h:1").kv_secret == secret
    assert up.https_context() is not None and UpSettings().https_context() is None
    with pytest.raises(ValueError, match="need --etcd"):
        UpSettings(etcd_ca=str(pki.ca))
    assert [f.name for f in dataclasses.fields(WorkerSettings) if f.name.startswith(("tls_", "etcd_"))] == [
        "tls_ca", "tls_cert", "tls_key", "etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password"]


# -- discovery through an etcd with client TLS and auth ------------------------------------------------------
@pytest.fixture(scope="module")
def etcd(pkis: tuple[Pki, Pki]) -> Iterator[str]:
    if not etcdctl_binary().exists():
        pytest.skip(f"no etcdctl beside the etcd binary ({etcdctl_binary()})")
    with secure_etcd(pkis[0], "tandem", PASSWORD, token_ttl_s=2) as endpoint:
        yield endpoint


def _record(worker_id: str, tls: bool) -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, role="decode", address="127.0.0.1:1", model="m", max_num_seqs=8,
                        num_kv_blocks=64, block_size=16, tls=tls)


async def test_workers_register_through_tls_and_auth(etcd: str, pkis: tuple[Pki, Pki]) -> None:
    """Registration, keep-alive, the watch and a clean stop's revoke all work with the client
    certificate and the password, past the token's TTL; a router with TLS settings uses only the
    workers that serve TLS."""
    access = _access(pkis[0], reauth_s=1.0)  # renewed well within the TTL, as 60 s is within etcd's 300 s
    tls_worker = WorkerRegistration(etcd, "sec", _record("tls-w", tls=True), ttl_s=5, access=access)
    plain_worker = WorkerRegistration(etcd, "sec", _record("plain-w", tls=False), ttl_s=5, access=access)
    pool = WorkerPool(etcd, "sec", access=access, credentials=grpc.ssl_channel_credentials(pkis[0].ca.read_bytes()))
    await pool.start()
    await tls_worker.start()
    await plain_worker.start()
    await pool.directory.wait_until(lambda d: len(d.workers()) == 2, 5)
    assert [h.worker_id for h in pool.workers()] == ["tls-w"]
    await asyncio.sleep(3)  # past the token TTL
    assert tls_worker.registrations == plain_worker.registrations == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    await plain_worker.stop()
    await pool.directory.wait_until(lambda d: len(d.workers()) == 1, 5)
    assert loop.time() - started < 2.0  # revoked, not expired (the lease has 5 s)
    await tls_worker.stop()
    await pool.stop()


@pytest.mark.parametrize("case", ["wrong password", "no password", "no client certificate", "other CA's certificate",
                                  "plaintext"])
async def test_etcd_refuses_outsiders(etcd: str, pkis: tuple[Pki, Pki], case: str) -> None:
    pki, rogue = pkis
    access = {"wrong password": _access(pki, password="guess"),
              "no password": _access(pki, user=None, password=None),
              "no client certificate": _access(pki, cert=None, key=None),
              "other CA's certificate": _access(pki, cert=str(rogue.cert), key=str(rogue.key)),
              "plaintext": EtcdAccess(user="tandem", password=PASSWORD)}[case]
    registration = WorkerRegistration(etcd, "sec", _record("outsider", tls=False), ttl_s=2, access=access,
                                      timeout_s=5.0)
    with pytest.raises(Exception, match=r"authentication failed|permission denied|failed to connect|Socket closed"):
        await registration.start()
    await registration.stop()


async def test_the_token_is_renewed_before_etcd_expires_it(etcd: str, pkis: tuple[Pki, Pki]) -> None:
    """etcd drops a token unused for its TTL (2 s here); a client renewing every second still works
    after a quiet spell, one that renews only every minute does not."""
    renewing = etcd_client(etcd, 2.0, _access(pkis[0], reauth_s=1.0))
    stale = etcd_client(etcd, 2.0, _access(pkis[0]))
    for client in (renewing, stale):
        await client.put(b"/tandem/token", b"1")
    await asyncio.sleep(3)
    assert (await renewing.get(b"/tandem/token")).value == b"1"
    with pytest.raises(Exception, match="invalid auth token"):
        await stale.get(b"/tandem/token")
    for client in (renewing, stale):
        await client.close()
