"""A plan's registry credentials, sealed with the cluster key.

They are never in the store or on the wire in clear text: the submission seals them into
`PlanDocument.sealed_auth`, and every node unseals them for its own pulls. If the key they were
sealed under is removed from the keyring, nodes fall back to their own Docker config.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping

from houndd.coordinator.plan.validation import validate_auth
from houndd.errors import HounddError
from houndd.image.credentials import RegistryCredential, auth_document
from houndd.wire.keyring import Keyring

log = logging.getLogger("houndd.coordinator")


def seal_credentials(keyring: Keyring, credentials: Mapping[str, RegistryCredential]) -> str:
    """`credentials` (registry -> credential) sealed under the primary key, as base64 text."""
    plain = json.dumps(auth_document(credentials))
    return base64.b64encode(keyring.seal(plain.encode())).decode()


def unseal_credentials(keyring: Keyring, sealed: str | None) -> dict[str, RegistryCredential]:
    """The credentials of a plan ({} when it has none or they cannot be read)."""
    if not sealed:
        return {}
    try:
        plain = keyring.open(base64.b64decode(sealed, validate=True))
        return validate_auth(json.loads(plain))
    except (HounddError, binascii.Error, ValueError) as e:
        # Never the content: it is a secret. A removed key is the usual cause.
        log.warning("plan credentials unreadable (key removed?) error=%s", type(e).__name__)
        return {}
