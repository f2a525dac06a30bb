"""Unmodified AWS clients against custody: boto3, the AWS CLI and the AWS Encryption SDK CLI."""

import base64
import datetime
import filecmp
import json
import os
import subprocess
import sys
import uuid

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError

from conftest import ROOT, custody_bin


def kms(**overrides):
    """A boto3 KMS client configured only by the environment (plus explicit test overrides)."""
    return boto3.session.Session().client("kms", config=botocore.config.Config(retries={"max_attempts": 1}), **overrides)


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def test_every_supported_action(aws_env):
    c = kms()
    meta = c.create_key(Description="boto3", Tags=[{"TagKey": "team", "TagValue": "a"}])["KeyMetadata"]
    key_id, arn = meta["KeyId"], meta["Arn"]
    assert arn == f"arn:aws:kms:us-east-1:{meta['AWSAccountId']}:key/{key_id}"
    assert isinstance(meta["CreationDate"], datetime.datetime)
    assert meta["KeyState"] == "Enabled" and meta["Enabled"] is True
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT" and meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    for ref in (key_id, arn):
        assert c.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == key_id

    alias = f"alias/boto3-{uuid.uuid4().hex[:8]}"
    c.create_alias(AliasName=alias, TargetKeyId=key_id)
    assert c.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == key_id
    alias_arn = arn.split(":key/")[0] + ":" + alias
    assert c.describe_key(KeyId=alias_arn)["KeyMetadata"]["KeyId"] == key_id
    other = c.create_key()["KeyMetadata"]["KeyId"]
    c.update_alias(AliasName=alias, TargetKeyId=other)
    listed = [a for a in c.list_aliases(KeyId=other)["Aliases"] if a["AliasName"] == alias]
    assert listed and isinstance(listed[0]["CreationDate"], datetime.datetime)
    c.delete_alias(AliasName=alias)

    # Cryptographic operations.
    ctx = {"purpose": "boto3"}
    blob = c.encrypt(KeyId=key_id, Plaintext=b"secret", EncryptionContext=ctx)
    assert blob["KeyId"] == arn and blob["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    out = c.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=ctx)
    assert out["Plaintext"] == b"secret" and out["KeyId"] == arn
    re = c.re_encrypt(CiphertextBlob=blob["CiphertextBlob"], SourceEncryptionContext=ctx, DestinationKeyId=other)
    assert re["SourceKeyId"] == arn and re["KeyId"].endswith(other)
    assert c.decrypt(CiphertextBlob=re["CiphertextBlob"])["Plaintext"] == b"secret"
    dk = c.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx)
    assert len(dk["Plaintext"]) == 32
    assert c.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)["Plaintext"] == dk["Plaintext"]
    dk = c.generate_data_key(KeyId=key_id, NumberOfBytes=64)
    assert len(dk["Plaintext"]) == 64
    wo = c.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_128")
    assert "Plaintext" not in wo and len(c.decrypt(CiphertextBlob=wo["CiphertextBlob"])["Plaintext"]) == 16
    assert len(c.generate_random(NumberOfBytes=48)["Plaintext"]) == 48

    # Rotation.
    c.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=180)
    status = c.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 180
    assert isinstance(status["NextRotationDate"], datetime.datetime)
    c.rotate_key_on_demand(KeyId=key_id)
    rotations = c.list_key_rotations(KeyId=key_id)["Rotations"]
    assert len(rotations) == 1 and rotations[0]["RotationType"] == "ON_DEMAND"
    assert c.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=ctx)["Plaintext"] == b"secret"
    c.disable_key_rotation(KeyId=key_id)
    assert c.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False

    # Tags and description.
    c.tag_resource(KeyId=key_id, Tags=[{"TagKey": "env", "TagValue": "test"}])
    c.untag_resource(KeyId=key_id, TagKeys=["team"])
    assert c.list_resource_tags(KeyId=key_id)["Tags"] == [{"TagKey": "env", "TagValue": "test"}]
    c.update_key_description(KeyId=key_id, Description="renamed")
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "renamed"

    # Lifecycle.
    c.disable_key(KeyId=key_id)
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    c.enable_key(KeyId=key_id)
    sched = c.schedule_key_deletion(KeyId=other, PendingWindowInDays=7)
    assert sched["KeyState"] == "PendingDeletion" and sched["PendingWindowInDays"] == 7
    assert isinstance(sched["DeletionDate"], datetime.datetime)
    assert c.describe_key(KeyId=other)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    c.cancel_key_deletion(KeyId=other)
    assert c.describe_key(KeyId=other)["KeyMetadata"]["KeyState"] == "Disabled"


def test_errors_are_the_aws_errors(aws_env):
    c = kms()
    key_id = c.create_key()["KeyMetadata"]["KeyId"]
    blob = c.encrypt(KeyId=key_id, Plaintext=b"x", EncryptionContext={"a": "1"})["CiphertextBlob"]

    with pytest.raises(ClientError) as e:
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "2"})
    assert error_code(e) == "InvalidCiphertextException"
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(c.exceptions.InvalidCiphertextException):
        c.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext={"a": "1"})
    with pytest.raises(c.exceptions.NotFoundException):
        c.describe_key(KeyId=str(uuid.uuid4()))
    with pytest.raises(c.exceptions.NotFoundException):
        c.encrypt(KeyId="alias/does-not-exist", Plaintext=b"x")
    with pytest.raises(c.exceptions.UnsupportedOperationException) as e:
        c.get_public_key(KeyId=key_id)
    assert "GetPublicKey" in e.value.response["Error"]["Message"]
    with pytest.raises(c.exceptions.UnsupportedOperationException):
        c.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    with pytest.raises(ClientError) as e:
        c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=31)
    assert error_code(e) == "ValidationException"
    with pytest.raises(c.exceptions.AlreadyExistsException):
        c.create_alias(AliasName="alias/dup-check", TargetKeyId=key_id)
        c.create_alias(AliasName="alias/dup-check", TargetKeyId=key_id)

    c.disable_key(KeyId=key_id)
    with pytest.raises(c.exceptions.DisabledException):
        c.encrypt(KeyId=key_id, Plaintext=b"x")
    with pytest.raises(c.exceptions.DisabledException):
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "1"})
    c.enable_key(KeyId=key_id)
    c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(c.exceptions.KMSInvalidStateException):
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "1"})


def test_bad_credentials(aws_env):
    wrong_secret = kms(aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError) as e:
        wrong_secret.list_keys()
    assert error_code(e) == "InvalidSignatureException"
    unknown_key = kms(aws_access_key_id="AKIAUNKNOWNUNKNOWN00", aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError) as e:
        unknown_key.list_keys()
    assert error_code(e) == "UnrecognizedClientException"
    wrong_region = kms(region_name="eu-west-1")
    with pytest.raises(ClientError) as e:
        wrong_region.list_keys()
    assert error_code(e) == "InvalidSignatureException"


def test_pagination(aws_env):
    c = kms()
    created = {c.create_key()["KeyMetadata"]["KeyId"] for _ in range(5)}
    pages = list(c.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2}))
    assert len(pages) >= 3
    seen = [k["KeyId"] for p in pages for k in p["Keys"]]
    assert len(seen) == len(set(seen)) and created <= set(seen)
    key_id = next(iter(created))
    for i in range(3):
        c.create_alias(AliasName=f"alias/page-{uuid.uuid4().hex[:6]}-{i}", TargetKeyId=key_id)
    alias_pages = list(c.get_paginator("list_aliases").paginate(KeyId=key_id, PaginationConfig={"PageSize": 1}))
    assert sum(len(p["Aliases"]) for p in alias_pages) == 3 and len(alias_pages) == 3
    for i in range(3):
        c.rotate_key_on_demand(KeyId=key_id)
    rot_pages = list(c.get_paginator("list_key_rotations").paginate(KeyId=key_id, PaginationConfig={"PageSize": 2}))
    assert [len(p["Rotations"]) for p in rot_pages] == [2, 1]


def aws_cli(*args, env, input_bytes=None):
    cli = os.path.join(os.path.dirname(sys.executable), "aws")
    out = subprocess.run([cli, *args], env=env, input=input_bytes, capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def test_aws_cli_round_trip(aws_env, tmp_path):
    env = dict(os.environ)
    arn = aws_cli("kms", "create-key", "--description", "aws cli", "--query", "KeyMetadata.Arn", "--output", "text", env=env)
    arn = arn.decode().strip()
    assert arn.startswith("arn:aws:kms:us-east-1:")
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"from the aws cli")
    ct = aws_cli("kms", "encrypt", "--key-id", arn, "--plaintext", f"fileb://{plain}", "--encryption-context", "app=cli",
                 "--query", "CiphertextBlob", "--output", "text", env=env)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(base64.b64decode(ct))
    pt = aws_cli("kms", "decrypt", "--ciphertext-blob", f"fileb://{blob}", "--encryption-context", "app=cli",
                 "--query", "Plaintext", "--output", "text", env=env)
    assert base64.b64decode(pt) == b"from the aws cli"


def test_aws_encryption_sdk_cli_multi_megabyte(aws_env, tmp_path):
    env = dict(os.environ)
    arn = kms().create_key(Description="esdk")["KeyMetadata"]["Arn"]
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    esdk = os.path.join(os.path.dirname(sys.executable), "aws-encryption-cli")
    common = ["--wrapping-keys", f"key={arn}", "--commitment-policy", "require-encrypt-require-decrypt",
              "--encryption-context", "purpose=interop", "-S"]
    enc = subprocess.run([esdk, "--encrypt", "--input", str(src), "--output", str(tmp_path / "data.enc"), *common],
                         env=env, capture_output=True)
    assert enc.returncode == 0, enc.stderr.decode()
    dec = subprocess.run([esdk, "--decrypt", "--input", str(tmp_path / "data.enc"), "--output", str(tmp_path / "data.out"), *common],
                         env=env, capture_output=True)
    assert dec.returncode == 0, dec.stderr.decode()
    assert filecmp.cmp(src, tmp_path / "data.out", shallow=False)
    # The message is an AWS Encryption SDK message naming the custody key.
    assert arn.encode() in (tmp_path / "data.enc").read_bytes()[:4096]


@pytest.mark.parametrize("algorithm", ["AES_256_GCM_HKDF_SHA512_COMMIT_KEY", "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384"])
def test_custody_and_the_aws_encryption_cli_read_each_others_messages(aws_env, tmp_path, algorithm):
    """The real AWS Encryption SDK CLI and `custody encrypt/decrypt`, both directions, with a custody
    KMS key: the SDK reaches custody over SigV4, custody over mTLS; the messages are the same format."""
    env = dict(os.environ)
    arn = kms().create_key(Description="interop")["KeyMetadata"]["Arn"]
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(1024 * 1024 + 17))
    esdk = os.path.join(os.path.dirname(sys.executable), "aws-encryption-cli")
    sdk = ["--wrapping-keys", f"key={arn}", "--commitment-policy", "require-encrypt-require-decrypt", "-S"]
    custody = [custody_bin()]
    cenv = dict(env, CUSTODY_PROFILE=aws_env["CUSTODY_PROFILE"])
    suite = "committed-signed" if algorithm.endswith("P384") else "committed"

    # SDK -> custody
    enc = subprocess.run([esdk, "--encrypt", "--input", str(src), "--output", str(tmp_path / "sdk.enc"),
                          "--algorithm", algorithm, "--frame-length", "4096",
                          "--encryption-context", "purpose=interop", *sdk], env=env, capture_output=True)
    assert enc.returncode == 0, enc.stderr.decode()
    dec = subprocess.run([*custody, "decrypt", "-k", arn, "--require-context", "purpose=interop",
                          "-o", str(tmp_path / "sdk.out"), str(tmp_path / "sdk.enc")], env=cenv, capture_output=True)
    assert dec.returncode == 0, dec.stderr.decode()
    assert filecmp.cmp(src, tmp_path / "sdk.out", shallow=False)

    # custody -> SDK
    enc = subprocess.run([*custody, "encrypt", "-k", arn, "-c", "purpose=interop", "--suite", suite,
                          "-o", str(tmp_path / "custody.enc"), str(src)], env=cenv, capture_output=True)
    assert enc.returncode == 0, enc.stderr.decode()
    dec = subprocess.run([esdk, "--decrypt", "--input", str(tmp_path / "custody.enc"), "--output",
                          str(tmp_path / "custody.out"), "--encryption-context", "purpose=interop", *sdk],
                         env=env, capture_output=True)
    assert dec.returncode == 0, dec.stderr.decode()
    assert filecmp.cmp(src, tmp_path / "custody.out", shallow=False)


def test_log_and_audit_name_the_access_key_but_never_the_secret(aws_env):
    c = kms()
    c.list_keys()
    with pytest.raises(ClientError):
        kms(aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key="y" * 40).list_keys()
    key_id = aws_env["AWS_ACCESS_KEY_ID"]
    secret = aws_env["AWS_SECRET_ACCESS_KEY"]
    log = open(aws_env["_LOG"]).read()
    assert key_id in log
    assert secret not in log and "y" * 40 not in log
    env = dict(os.environ, CUSTODY_PROFILE=aws_env["CUSTODY_PROFILE"])
    out = subprocess.run([custody_bin(), "--json", "audit", "query", "--limit", "1000"], env=env, capture_output=True, check=True)
    records = json.loads(out.stdout)["Records"]
    signed = [r for r in records if r.get("access_key_id") == key_id]
    assert any(r["outcome"] == "Success" for r in signed)
    text = out.stdout.decode()
    assert secret not in text and "Signature=" not in text


def test_hmac_keys(aws_env):
    c = kms()
    meta = c.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    assert meta["KeySpec"] == "HMAC_256" and meta["KeyUsage"] == "GENERATE_VERIFY_MAC"
    assert meta["MacAlgorithms"] == ["HMAC_SHA_256"] and "EncryptionAlgorithms" not in meta
    key_id = meta["KeyId"]
    mac = c.generate_mac(KeyId=key_id, Message=b"hello", MacAlgorithm="HMAC_SHA_256")
    assert len(mac["Mac"]) == 32 and mac["KeyId"] == meta["Arn"]
    ok = c.verify_mac(KeyId=key_id, Message=b"hello", Mac=mac["Mac"], MacAlgorithm="HMAC_SHA_256")
    assert ok["MacValid"] is True
    with pytest.raises(c.exceptions.KMSInvalidMacException):
        c.verify_mac(KeyId=key_id, Message=b"hellO", Mac=mac["Mac"], MacAlgorithm="HMAC_SHA_256")
    with pytest.raises(c.exceptions.InvalidKeyUsageException):
        c.generate_mac(KeyId=key_id, Message=b"hello", MacAlgorithm="HMAC_SHA_512")
    with pytest.raises(c.exceptions.InvalidKeyUsageException):
        c.encrypt(KeyId=key_id, Plaintext=b"x")
    symmetric = c.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(c.exceptions.InvalidKeyUsageException):
        c.generate_mac(KeyId=symmetric, Message=b"x", MacAlgorithm="HMAC_SHA_256")
    with pytest.raises(c.exceptions.UnsupportedOperationException):
        c.enable_key_rotation(KeyId=key_id)
    for spec, n in (("HMAC_224", 28), ("HMAC_384", 48), ("HMAC_512", 64)):
        k = c.create_key(KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
        alg = "HMAC_SHA_" + spec.split("_")[1]
        assert len(c.generate_mac(KeyId=k, Message=b"m", MacAlgorithm=alg)["Mac"]) == n


def test_key_policies_are_kept(aws_env):
    c = kms()
    key_id = c.create_key()["KeyMetadata"]["KeyId"]
    assert c.list_key_policies(KeyId=key_id)["PolicyNames"] == ["default"]
    default = json.loads(c.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    account = c.describe_key(KeyId=key_id)["KeyMetadata"]["AWSAccountId"]
    # The default policy: the tenant's key admins administer; `custody dev` adds use by its key users.
    assert default["Statement"][0]["Principal"]["AWS"] == f"arn:aws:iam::{account}:root"
    assert "kms:PutKeyPolicy" in default["Statement"][0]["Action"]
    assert "kms:Decrypt" not in default["Statement"][0]["Action"]
    assert any("kms:Decrypt" in s["Action"] for s in default["Statement"][1:])
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "admins", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
         "Action": ["kms:Get*", "kms:Put*", "kms:Describe*"], "Resource": "*"},
        {"Sid": "x", "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:Decrypt", "Resource": "*"}]}
    c.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    assert json.loads(c.get_key_policy(KeyId=key_id)["Policy"]) == policy
    with pytest.raises(c.exceptions.MalformedPolicyDocumentException):
        c.put_key_policy(KeyId=key_id, PolicyName="default", Policy="{not json")
    with pytest.raises(c.exceptions.MalformedPolicyDocumentException):
        c.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps({"Statement": [{"Effect": "Maybe"}]}))
    assert json.loads(c.get_key_policy(KeyId=key_id)["Policy"]) == policy, "a refused policy changes nothing"
    created = c.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    assert json.loads(c.get_key_policy(KeyId=created)["Policy"]) == policy


def test_grants_are_kept(aws_env):
    c = kms()
    key_id = c.create_key()["KeyMetadata"]["KeyId"]
    grantee = "arn:aws:iam::111122223333:role/app"
    g = c.create_grant(KeyId=key_id, GranteePrincipal=grantee, RetiringPrincipal=grantee,
                       Operations=["Decrypt", "GenerateDataKey"], Name="app-grant",
                       Constraints={"EncryptionContextSubset": {"app": "x"}})
    again = c.create_grant(KeyId=key_id, GranteePrincipal=grantee, RetiringPrincipal=grantee,
                           Operations=["Decrypt", "GenerateDataKey"], Name="app-grant",
                           Constraints={"EncryptionContextSubset": {"app": "x"}})
    assert again["GrantId"] == g["GrantId"], "CreateGrant is idempotent by name"
    second = c.create_grant(KeyId=key_id, GranteePrincipal=grantee, Operations=["Encrypt"])
    grants = c.list_grants(KeyId=key_id)["Grants"]
    assert {x["GrantId"] for x in grants} == {g["GrantId"], second["GrantId"]}
    entry = next(x for x in grants if x["GrantId"] == g["GrantId"])
    assert entry["Operations"] == ["Decrypt", "GenerateDataKey"] and entry["Name"] == "app-grant"
    assert entry["Constraints"] == {"EncryptionContextSubset": {"app": "x"}}
    assert isinstance(entry["CreationDate"], datetime.datetime)
    pages = list(c.get_paginator("list_grants").paginate(KeyId=key_id, PaginationConfig={"PageSize": 1}))
    assert len(pages) == 2
    retirable = c.list_retirable_grants(RetiringPrincipal=grantee)["Grants"]
    assert [x["GrantId"] for x in retirable] == [g["GrantId"]]
    c.retire_grant(GrantToken=g["GrantToken"])
    c.revoke_grant(KeyId=key_id, GrantId=second["GrantId"])
    assert c.list_grants(KeyId=key_id)["Grants"] == []
    with pytest.raises(c.exceptions.InvalidGrantTokenException):
        c.retire_grant(GrantToken=g["GrantToken"])
    with pytest.raises(ClientError) as e:
        c.create_grant(KeyId=key_id, GranteePrincipal=grantee, Operations=["Frobnicate"])
    assert error_code(e) == "ValidationException"
