"""Test-support library for intercloud integration and end-to-end tests.

Why this exists: the tests that matter run the real ``intercloud`` processes against real
servers, real ``nc`` and a real squid. Doing that without flakiness needs the same few rules
everywhere, so they live here once:

* never sleep a fixed time: wait on a readiness condition with a deadline (``timeouts``);
* scale every deadline by ``INTERCLOUD_TEST_TIMEOUT_FACTOR`` for slow machines (``timeouts``);
* bind port 0 / pick free loopback ports (``ports``);
* every child process is tracked and killed at teardown; a leftover fails the test (``procs``).

Modules: timeouts, ports, procs, gateway, servers, netcat, squid, pki, markers.
"""
