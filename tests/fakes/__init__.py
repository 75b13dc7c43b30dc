"""Purpose-built fakes of the processes keel talks to (real sockets, no mocks)."""
