"""deploy/: the systemd units pass systemd's own check, and the settings
files beside them name only settings mkv reads."""
import os
import re
import shutil
import subprocess

import pytest

from mkvlib.settings import unknown_names
from conftest import ROOT

DEPLOY = os.path.join(ROOT, "deploy")
UNITS = sorted(f for f in os.listdir(DEPLOY) if f.endswith(".service"))
ENV_FILES = sorted(f for f in os.listdir(DEPLOY) if f.endswith(".env"))


def test_every_part_of_mkv_has_a_unit():
    assert UNITS == ["mkv-master.service", "mkv-s3.service", "mkv-volume@.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze on this machine")
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    # as installed: the checkout in /opt/mkv (here: this one), the settings in /etc/mkv/
    for name in UNITS + ENV_FILES:
        with open(os.path.join(DEPLOY, name)) as f:
            text = f.read().replace("/opt/mkv", ROOT).replace("/etc/mkv/", f"{tmp_path}/")
        (tmp_path / name.replace("@.service", "@3001.service")).write_text(text)
    units = [f"./{name.replace('@.service', '@3001.service')}" for name in UNITS]
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


@pytest.mark.parametrize("name", ENV_FILES)
def test_a_settings_file_names_only_settings_mkv_reads(name):
    with open(os.path.join(DEPLOY, name)) as f:
        named = dict(re.findall(r"^#?(MKV_[A-Z0-9_]+)=(.*)$", f.read(), re.M))   # commented ones too
    assert named and unknown_names(named) == []


def test_each_units_settings_file_is_in_deploy():
    for unit in UNITS:
        with open(os.path.join(DEPLOY, unit)) as f:
            for path in re.findall(r"^EnvironmentFile=-?/etc/mkv/(\S+)$", f.read(), re.M):
                assert path == "volume.env" or path in ENV_FILES, (unit, path)
