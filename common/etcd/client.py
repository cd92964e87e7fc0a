"""The aetcd client every etcd connection goes through (see EtcdAccess).

aetcd 1.0 (pinned in requirements.txt) opens only plaintext channels and authenticates once, at
connect. `EtcdClient` keeps aetcd's API and fills both gaps: it opens a TLS channel when the
access names a CA, and it authenticates again every `reauth_s`, because etcd's auth tokens expire
(`--auth-token-ttl`, 300 s by default) and lease keep-alives do not renew them, so a quiet
worker's token would otherwise lapse. A watch checks its token only when it is created; a broken
watch is re-created on a fresh client by its owner (cluster.discovery).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from common.etcd.access import EtcdAccess


class EtcdClient(aetcd.Client):
    """aetcd.Client over `access`: TLS when it names a CA, a token renewed every `reauth_s` when it
    names a user. Overrides aetcd 1.0's `connect` and sets the attributes it would."""

    _is_connecting: bool
    metadata: tuple[tuple[str, str], ...] | None

    def __init__(self, host: str, port: int, access: EtcdAccess, **kwargs: Any) -> None:
        super().__init__(host, port, username=access.user, password=access.password, **kwargs)
        self._credentials = access.credentials()
        self._reauth_s = access.reauth_s
        self._authenticated_at = 0.0

    async def connect(self) -> None:  # aetcd runs it before every call
        if self._connected.is_set():
            loop = asyncio.get_running_loop()
            if self._username is not None and loop.time() - self._authenticated_at > self._reauth_s:
                self._authenticated_at = loop.time()  # one renewal at a time, even with calls in parallel
                await self._authenticate()
            return
        if self._is_connecting:  # another task is connecting
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target, options = f"{self._host}:{self._port}", list(self._options.items())
            self.channel = (grpc.aio.insecure_channel(target, options=options) if self._credentials is None
                            else grpc.aio.secure_channel(target, self._credentials, options=options))
            if self._username is not None:
                self._authenticated_at = asyncio.get_running_loop().time()
                await self._authenticate()
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        except BaseException:  # e.g. authentication refused: no half-open channel left behind
            if self.channel is not None:
                await self.channel.close()
            self._init_channel_attrs()
            raise
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        self.auth_stub = rpc.AuthStub(self.channel)
        reply = await self.auth_stub.Authenticate(
            rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
        self.metadata = (("token", reply.token),)
