"""open_store's explicit AWS settings: given to the S3 client, never put in the environment."""

from __future__ import annotations

import os

import pytest

from app.snapshots.store import S3Store, open_store

AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-3",
       "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}


def test_explicit_aws_settings_reach_the_client_and_leave_the_environment_alone() -> None:
    before = dict(os.environ)
    store = open_store("s3://bucket/some/prefix", AWS)
    assert isinstance(store, S3Store) and store.url == "s3://bucket/some/prefix/"
    assert (store.client.meta.endpoint_url, store.client.meta.region_name) == (
        "http://127.0.0.1:9", "eu-west-3")
    credentials = store.client._request_signer._credentials.get_frozen_credentials()
    assert tuple(credentials)[:3] == ("key", "secret", "token")
    assert dict(os.environ) == before


def test_an_unknown_aws_setting_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="AWS_PROFILE"):
        open_store("s3://bucket/p", {"AWS_PROFILE": "x"})
