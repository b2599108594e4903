#!/bin/sh
# /init of the guest-images initramfs (busybox sh).
#
# Mounts /proc, /sys and /dev, runs the guest workload named on the kernel command line, prints
# its result lines on the console and stops the guest (reboot -f: the VMM treats the reset as a
# shutdown with status 0).
#
# Kernel command line:  workload=OP,key=value,...   e.g. workload=verify,mib=64,seed=7,wait-secs=5
# OP is fill, verify or churn (see `guest-workload --help`); each key=value becomes --key value.
# workload=shell starts a shell on the console instead. Without workload=, runs verify,mib=16.

# Prints the workload= value of the kernel command line $1 (default verify,mib=16).
workload_spec() {
    spec="verify,mib=16"
    for arg in $1; do
        case "$arg" in
            workload=*) spec="${arg#workload=}" ;;
        esac
    done
    echo "$spec"
}

# Prints the workload arguments for the spec $1 ("OP,key=value,...").
workload_args() {
    IFS=,
    set -- $1
    unset IFS
    line="$1"
    [ $# -gt 0 ] && shift
    for kv in "$@"; do
        case "$kv" in
            *=*) line="$line --${kv%%=*} ${kv#*=}" ;;
            *) line="$line --$kv" ;;
        esac
    done
    echo "$line"
}

# Host-side tests source this file for the functions above only.
[ "${INIT_FUNCTIONS_ONLY:-0}" = 1 ] && return 0

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

args=$(workload_args "$(workload_spec "$(cat /proc/cmdline)")")
set -- $args
echo "WORKLOAD START op=$1"
if [ "$1" = shell ]; then
    exec /bin/sh
fi
/bin/guest-workload "$@"
echo "WORKLOAD EXIT status=$?"
sync
# let the console drain before the reset
sleep 1
reboot -f
poweroff -f
