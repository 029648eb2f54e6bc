"""The real-kexec VM test (``make vm-test``): image build, host driver, guest driver."""
