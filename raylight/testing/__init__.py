"""Test support: helpers the test suite shares, and the rank functions its multi-process tests
spawn (a spawned process imports its target by module name). Not used by the library itself."""
