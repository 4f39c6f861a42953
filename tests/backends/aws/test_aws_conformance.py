"""AwsBackend against the shared conformance suite (tests/backends/conformance.py), with moto's
STS and IAM over HTTP.

``credential_works`` authenticates the credential at moto's STS and checks the role's policies
as moto stores them; moto does not evaluate conditions, so the Deny semantics are applied by
the test (see Moto.credential_works).
"""

from __future__ import annotations

import pytest

from broker.backends.aws import AwsBackend
from broker.backends.base import Backend, Credential
from tests.backends.aws.conftest import Moto, make_grant
from tests.backends.conformance import BackendConformance, NewGrant, Works

pytestmark = pytest.mark.integration  # moto over HTTP


class TestAwsConformance(BackendConformance):
    @pytest.fixture
    def backend(self, aws: AwsBackend) -> Backend:
        return aws

    @pytest.fixture
    def new_grant(self) -> NewGrant:
        return make_grant

    @pytest.fixture
    def credential_works(self, moto: Moto) -> Works:
        def works(cred: Credential) -> bool:
            return moto.credential_works(dict(cred.extra["aws_credentials"]))

        return works


def test_the_credential_hides_its_secrets_and_is_external(aws: AwsBackend) -> None:
    cred = aws.issue(make_grant())
    assert cred.extra["aws_credentials"]["secret_access_key"] not in repr(cred)
    assert cred.access_token not in repr(cred)
    assert aws.external is True  # an STS session exists at AWS once issued
