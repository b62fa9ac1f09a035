#!/usr/bin/env bash
# An SSH server on 127.0.0.1 for the cluster launcher test (tests/test_launcher.py), which
# runs `ray up`, `ray submit` and `ray down` against it with deploy/cluster-onprem.yaml.
# Needs root (it creates a user and runs sshd); CI runs it from .ci/run. By hand:
#
#   python_exe=$(python -c 'import sys; print(sys.executable)')  # the Python to test with
#   sudo PYTHON="$python_exe" bash .ci/sshd.sh start /tmp/apex-dqn-sshd
#   source /tmp/apex-dqn-sshd/env
#   python -m pytest -q -p no:cacheprovider tests/test_launcher.py
#   sudo bash .ci/sshd.sh stop /tmp/apex-dqn-sshd
#
# start DIR:
#   - installs openssh-server, rsync, netcat-openbsd and acl with apt-get where missing;
#   - creates the unprivileged user APEX_DQN_SSH_USER (default apexdqn-ci), with
#     ~/.apex-dqn-launcher-test marking it as this test's own: `ray down` runs `ray stop`
#     as that user, which ends every Ray process the user can signal, so the test refuses
#     any other user, and no other Ray on the machine is touched;
#   - lets that user run $PYTHON and read its packages, with traverse-only ACL entries for
#     that user alone on the directories above them that it could not enter (a Python under
#     a home directory such as /root is otherwise out of its reach): the cluster's venv is
#     made from that Python and sees those packages, so nothing is downloaded;
#   - makes a throwaway client key and a host key in DIR and starts sshd with a config file
#     of its own (DIR/sshd_config, never the system's), bound to 127.0.0.1 on a free port
#     outside 22 and Ray's ports, key login for that user only;
#   - writes DIR/env: APEX_DQN_SSH_PORT, APEX_DQN_SSH_USER, APEX_DQN_SSH_KEY.
# stop DIR: stops that sshd by its pid, removes the key from the user's authorized_keys and
# the ACL entries start added, then DIR. The user stays (it cannot log in without a key).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
dir=$2
user=${APEX_DQN_SSH_USER:-apexdqn-ci}
python=${PYTHON:-python}
marker=.apex-dqn-launcher-test

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (it creates the user $user and runs sshd); try sudo" >&2
    exit 2
fi

as_user() {
    runuser -u "$user" -- "$@"
}

install_missing() {
    local missing=()
    command -v /usr/sbin/sshd > /dev/null || missing+=(openssh-server)
    command -v rsync > /dev/null || missing+=(rsync)
    command -v nc > /dev/null || missing+=(netcat-openbsd)
    command -v setfacl > /dev/null || missing+=(acl)
    command -v ssh > /dev/null || missing+=(openssh-client)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" > /dev/null
    fi
}

create_user() {
    if ! id -u "$user" > /dev/null 2>&1; then
        useradd --create-home --shell /bin/bash --user-group "$user"
        local home
        home=$(getent passwd "$user" | cut -d: -f6)
        touch "$home/$marker"
        chown "$user:" "$home/$marker"
    fi
    local home
    home=$(getent passwd "$user" | cut -d: -f6)
    if [ ! -f "$home/$marker" ]; then
        echo "$0: user $user exists and is not the launcher test's (no ~/$marker):" \
            "choose another APEX_DQN_SSH_USER" >&2
        exit 2
    fi
    # No password, but not locked: sshd without PAM refuses locked accounts, even by key.
    usermod -p '*' "$user"
}

# Directories the user must enter (x) to run $python and import its packages.
grant_python() {
    local paths
    paths=$("$python" -c '
import os, site, sys, sysconfig
print(os.path.realpath(sys._base_executable))
print(sysconfig.get_paths()["stdlib"])
for p in site.getsitepackages():
    print(p)
')
    : > "$dir/acl"
    local path d up
    while IFS= read -r path; do
        d=$path
        [ -d "$d" ] || d=$(dirname "$d")
        up=()  # from / down to the directory: each is checked once the one above is open
        while :; do
            up=("$d" "${up[@]}")
            [ "$d" = / ] && break
            d=$(dirname "$d")
        done
        for d in "${up[@]}"; do
            if ! as_user test -x "$d"; then
                # Remembered with whether it had an ACL of its own, for stop to restore.
                if [ -n "$(getfacl -c --skip-base "$d" 2> /dev/null)" ]; then
                    printf 'extended\t%s\n' "$d" >> "$dir/acl"
                else
                    printf 'plain\t%s\n' "$d" >> "$dir/acl"
                fi
                setfacl -m "u:$user:x" "$d"
            fi
        done
    done <<< "$paths"
    local base
    base=$(head -n 1 <<< "$paths")
    # The cluster's venv adds these site-packages to its path; check they import.
    if ! as_user env PYTHONPATH="$(tail -n +3 <<< "$paths" | paste -sd:)" \
        "$base" -c 'import ray, torch, ale_py' 2> "$dir/python-check.log"; then
        echo "$0: user $user cannot import ray, torch and ale_py with $base:" >&2
        cat "$dir/python-check.log" >&2
        exit 1
    fi
}

free_port() {
    "$python" -c '
import socket
while True:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not 10000 <= port <= 19999:  # Ray client server and worker ports
        print(port)
        break
'
}

start() {
    if [ -e "$dir/sshd.pid" ]; then
        echo "$0: $dir already holds a running setup; stop it first" >&2
        exit 2
    fi
    install_missing
    mkdir -p "$dir"
    chmod 700 "$dir"
    create_user
    grant_python
    local home
    home=$(getent passwd "$user" | cut -d: -f6)
    rm -f "$dir/host_ed25519" "$dir/host_ed25519.pub" "$dir/id_ed25519" "$dir/id_ed25519.pub"
    ssh-keygen -q -t ed25519 -N '' -C apex-dqn-launcher-test-host -f "$dir/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C apex-dqn-launcher-test -f "$dir/id_ed25519"
    install -d -m 700 -o "$user" -g "$(id -gn "$user")" "$home/.ssh"
    cat "$dir/id_ed25519.pub" >> "$home/.ssh/authorized_keys"
    chown "$user:" "$home/.ssh/authorized_keys"
    chmod 600 "$home/.ssh/authorized_keys"
    mkdir -p /run/sshd  # sshd's privilege separation directory
    chmod 755 /run/sshd
    local port tries=0
    while :; do
        port=$(free_port)
        cat > "$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AllowUsers $user
AuthenticationMethods publickey
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
MaxStartups 30
MaxSessions 30
EOF
        /usr/sbin/sshd -t -f "$dir/sshd_config"
        if /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"; then
            for _ in $(seq 50); do
                [ -s "$dir/sshd.pid" ] && break
                sleep 0.1
            done
            [ -s "$dir/sshd.pid" ] && break
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 5 ]; then
            echo "$0: sshd did not start:" >&2
            cat "$dir/sshd.log" >&2
            exit 1
        fi
    done
    cat > "$dir/env" <<EOF
export APEX_DQN_SSH_PORT=$port
export APEX_DQN_SSH_USER=$user
export APEX_DQN_SSH_KEY=$dir/id_ed25519
EOF
    # The way Ray's command runner reaches it: a proxy command, as Ray's SSH has no port.
    if ! ssh -i "$dir/id_ed25519" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
        -o "ProxyCommand=nc 127.0.0.1 $port" "$user@127.0.0.1" "test -f ~/$marker"; then
        echo "$0: cannot log in as $user through sshd on 127.0.0.1:$port:" >&2
        cat "$dir/sshd.log" >&2
        exit 1
    fi
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        # The test runs as the person who ran sudo: the client key and env are theirs.
        chown "$SUDO_USER" "$dir" "$dir/id_ed25519" "$dir/id_ed25519.pub" "$dir/env"
    fi
    echo "sshd (pid $(cat "$dir/sshd.pid")) on 127.0.0.1:$port for $user; source $dir/env"
}

stop() {
    [ -d "$dir" ] || return 0
    if [ -s "$dir/sshd.pid" ]; then
        local pid
        pid=$(cat "$dir/sshd.pid")
        # Only the sshd this script started: its command line names this config file.
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -qF "$dir/sshd_config"; then
            kill "$pid"
            for _ in $(seq 50); do
                kill -0 "$pid" 2> /dev/null || break
                sleep 0.1
            done
        fi
    fi
    local home
    home=$(getent passwd "$user" | cut -d: -f6 || true)
    if [ -n "$home" ] && [ -f "$dir/id_ed25519.pub" ] && [ -f "$home/.ssh/authorized_keys" ]; then
        grep -vxF -f "$dir/id_ed25519.pub" "$home/.ssh/authorized_keys" \
            > "$home/.ssh/authorized_keys.new" || true
        chown "$user:" "$home/.ssh/authorized_keys.new"
        mv "$home/.ssh/authorized_keys.new" "$home/.ssh/authorized_keys"
    fi
    if [ -f "$dir/acl" ]; then
        while IFS=$'\t' read -r had d; do
            if [ "$had" = plain ]; then
                setfacl -b "$d" 2> /dev/null || true
            else
                setfacl -x "u:$user" "$d" 2> /dev/null || true
            fi
        done < "$dir/acl"
    fi
    rm -f "$dir"/{sshd_config,sshd.pid,sshd.log,env,acl,python-check.log}
    rm -f "$dir"/{host_ed25519,host_ed25519.pub,id_ed25519,id_ed25519.pub}
    rmdir "$dir" 2> /dev/null || echo "$0: left $dir (it holds files of its own)" >&2
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
