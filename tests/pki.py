"""Certificates made in the tests (the `trustme` package, a test extra): a CA and node
certificates written as PEM files, as an operator's openssl would make them
(docs/operations/security.md). Every test makes its own; nothing is checked in."""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
import trustme


@attrs.frozen
class Pair:
    """A certificate file and its private key file."""

    cert: Path
    key: Path


class PKI:
    """A CA whose files live in `root`; `issue` writes node certificates next to it."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.name = name
        self.ca = trustme.CA(organization_name=f"metanode test {name}")
        self.ca_cert = root / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_cert))

    def issue(
        self,
        name: str,
        *hosts: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Pair:
        """A certificate for `hosts` (default 127.0.0.1 and localhost), usable by a
        server and a client (trustme sets both extended key usages)."""
        leaf = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")), common_name=name,
                                  not_before=not_before, not_after=not_after)  # fmt: skip
        pair = Pair(self.root / f"{self.name}-{name}.crt", self.root / f"{self.name}-{name}.key")
        leaf.cert_chain_pems[0].write_to_path(str(pair.cert))
        leaf.private_key_pem.write_to_path(str(pair.key))
        return pair

    def raft_flags(self, pair: Pair) -> list[str]:
        return ["--raft-tls-server-cert", str(pair.cert), "--raft-tls-server-key", str(pair.key),
                "--raft-tls-server-root-ca-cert", str(self.ca_cert)]  # fmt: skip

    def raft_toml(self, pair: Pair) -> str:
        """The `[raft_config]` lines of the raft port's mutual TLS."""
        return (f'raft_tls_server_cert = "{pair.cert}"\nraft_tls_server_key = "{pair.key}"\n'
                f'raft_tls_server_root_ca_cert = "{self.ca_cert}"\n')  # fmt: skip
