"""The pure core of the protocol: key layout, JSON documents and their schema, round
decisions and time stamps. Imports only the standard library, numpy and :mod:`fedfs.errors`."""
