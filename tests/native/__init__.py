"""Tests of the native engine (msgsock.native over msgsock._engine)."""
